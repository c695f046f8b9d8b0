"""Live progress over WebSockets: snapshot first, then changes; authenticated,
origin-checked, scoped; one poller per process however many watch.

The consumers run through the real ASGI stack (origin validator, session auth, router)
with real sessions. Tests are transactional: the hub reads the DB from worker threads,
which only see committed rows. On the scale-out pass (REDIS_URL set) the same tests run
against channels-redis, where publish_job() wakes the poller.
"""

import asyncio
import os
import time
import uuid

import pytest
import pytest_asyncio
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import OperationalError, connection, connections, transaction
from django.db.models import F
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hosts.models import VM, Host
from kvmweb.asgi import application
from migrations_app import streaming
from migrations_app.models import JobEvent, MigrationJob, ProgressSample

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
ORIGIN = b"http://127.0.0.1"
TIMEOUT = 15  # generous: the machine may be loaded (a first render compiles templates)


@pytest_asyncio.fixture(autouse=True)
async def fast_poll(monkeypatch):
    monkeypatch.setattr(streaming, "POLL_INTERVAL", 0.05)
    yield
    # The hub and the consumers read from asgiref's sync thread; close its connection so
    # the test database can be dropped (PostgreSQL refuses while a session is open).
    await database_sync_to_async(connections.close_all)()
    await streaming.close_poller_db()


@pytest.fixture
def jobs(transactional_db, alice, bob):
    """Two hosts; a running job of alice's VM and one of bob's VM."""
    src = Host.objects.create(name="src", uri="test:///src")
    dst = Host.objects.create(name="dst", uri="test:///dst")

    def job_for(owner, name):
        vm = VM.objects.create(uuid=uuid.uuid4(), name=name, host=src, owner_user=owner)
        job = MigrationJob.objects.create(
            vm=vm,
            vm_name=name,
            source=src,
            source_name=src.name,
            target=dst,
            target_name=dst.name,
            mode=MigrationJob.LIVE,
            status=MigrationJob.RUNNING,
            started_at=timezone.now(),
            phase="memory",
            percent=12.5,
            progress_seq=3,
        )
        JobEvent.objects.create(job=job, message=f"started {name}")
        ProgressSample.objects.create(job=job, t=0.25, rate=1000, remaining=5000)
        return job

    return {"alice": job_for(alice, "alice-vm"), "bob": job_for(bob, "bob-vm")}


def session_cookie(user):
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def communicator(path, user=None, origin=ORIGIN):
    headers = [(b"host", b"127.0.0.1"), (b"origin", origin)]
    if user is not None:
        cookie = await database_sync_to_async(session_cookie)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def connected(path, user):
    comm = await communicator(path, user)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    return comm


def _retried(fn):
    """Run a write in one transaction. The test database is in-memory SQLite with a
    shared cache, where a reader (the hub's DB thread) makes a writer fail at once with
    "table is locked" instead of waiting (a file database waits on busy_timeout): retry
    the whole transaction like a busy timeout would (seen on a loaded machine)."""
    for attempt in range(100):
        try:
            with transaction.atomic():
                return fn()
        except OperationalError:
            if attempt == 99:
                raise
            time.sleep(0.02)


@database_sync_to_async
def write_progress(job, **fields):
    """What the worker does: update the row (bumping progress_seq), then publish."""
    _retried(
        lambda: MigrationJob.objects.filter(pk=job.pk).update(progress_seq=F("progress_seq") + 1, **fields)
    )
    streaming.publish_job(job.pk)


@database_sync_to_async
def add_event(job, message):
    def write():
        JobEvent.objects.create(job=job, message=message)
        MigrationJob.objects.filter(pk=job.pk).update(progress_seq=F("progress_seq") + 1)

    _retried(write)
    streaming.publish_job(job.pk)


async def receive_until(comm, needle, timeout=TIMEOUT):
    """Messages until one contains needle; returns it (fails on timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = await comm.receive_from(timeout=max(0.01, deadline - loop.time()))
        if needle in text:
            return text


async def settled(hub):
    """Until the poller finished a tick that started after this call (its first tick
    renders the current state for a new watcher)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    ticks = hub.ticks
    while hub.ticks < ticks + 2 and loop.time() < deadline:
        hub.wake.set()
        await asyncio.sleep(0.05)


async def assert_closed_with(comm, code):
    message = await comm.receive_output(timeout=TIMEOUT)
    assert message == {"type": "websocket.close", "code": code}
    assert await comm.receive_nothing(timeout=0.3)


async def test_it_sends_the_current_state_first(jobs, operator):
    job = jobs["bob"]
    comm = await connected(f"/ws/jobs/{job.pk}/", operator)
    text = await comm.receive_from(timeout=TIMEOUT)
    assert f'id="job-progress-{job.pk}"' in text and 'hx-swap-oob="true"' in text
    assert "12.5 %" in text and 'data-seq="3"' in text
    assert "started bob-vm" in text  # the whole event log
    assert f'id="job-samples-{job.pk}"' in text and "[0.250,1000,5000]" in text
    await comm.disconnect()


async def test_it_pushes_progress_writes_and_new_events(jobs, alice):
    job = jobs["alice"]
    comm = await connected(f"/ws/jobs/{job.pk}/", alice)
    await comm.receive_from(timeout=TIMEOUT)
    await write_progress(
        job, percent=42.5, phase="completing", rate=7 * 1024 * 1024, progress_at=timezone.now()
    )
    text = await receive_until(comm, "42.5 %")
    assert "completing" in text and "7.0\xa0MB/s" in text and 'data-seq="4"' in text
    await add_event(job, "switched to post-copy")
    text = await receive_until(comm, "switched to post-copy")
    assert f'<ol id="job-events-{job.pk}" hx-swap-oob="beforeend">' in text
    assert "started alice-vm" not in text  # only the new line
    await write_progress(job, status=MigrationJob.SUCCEEDED, percent=99.0, downtime_ms=87)
    text = await receive_until(comm, 'data-final="1"')
    assert "100 %" in text and "87 ms" in text
    await comm.disconnect()


async def test_it_tells_nothing_about_jobs_out_of_scope(jobs, alice, mallory):
    alice_job, bob_job = jobs["alice"], jobs["bob"]
    attempts = [
        (mallory, alice_job.pk),
        (alice, bob_job.pk),
        (alice, bob_job.pk + 1000),  # does not exist: the very same answer
    ]
    comms = []
    for user, pk in attempts:
        comm = await communicator(f"/ws/jobs/{pk}/", user)
        ok, _ = await comm.connect(timeout=TIMEOUT)
        assert ok
        await assert_closed_with(comm, 4404)
        comms.append(comm)
    # A later write to those jobs reaches none of them, and the hub keeps no watcher.
    await write_progress(bob_job, percent=77.0)
    await write_progress(alice_job, percent=66.0)
    for comm in comms:
        assert await comm.receive_nothing(timeout=0.3)
    assert streaming.get_hub().watcher_count == 0


async def test_it_rejects_anonymous_watchers(jobs):
    for path in (f"/ws/jobs/{jobs['alice'].pk}/", "/ws/jobs/"):
        comm = await communicator(path)
        ok, _ = await comm.connect(timeout=TIMEOUT)
        assert ok
        await assert_closed_with(comm, 4401)


async def test_it_refuses_a_foreign_origin(jobs, operator):
    comm = await communicator(f"/ws/jobs/{jobs['alice'].pk}/", operator, origin=b"http://evil.example")
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert not ok
    assert streaming.get_hub().watcher_count == 0


async def test_it_runs_one_poller_and_renders_once_for_many_watchers(jobs, operator, auditor):
    job = jobs["bob"]
    hub = streaming.get_hub()
    watchers = [await connected(f"/ws/jobs/{job.pk}/", operator) for _ in range(20)]
    watchers += [await connected(f"/ws/jobs/{job.pk}/", auditor) for _ in range(5)]
    for comm in watchers:
        await comm.receive_from(timeout=TIMEOUT)
    assert hub.watcher_count == 25 and hub.poller_starts == 1
    pollers = [t for t in asyncio.all_tasks() if t.get_name() == "kvmweb-job-poller" and not t.done()]
    assert len(pollers) == 1
    await asyncio.sleep(0.2)  # let the poller settle on the current state
    queries = []  # SQL statements per tick, counted on the poller's own thread
    read_and_render = hub._read_and_render

    def counting(*args):
        with CaptureQueriesContext(connection) as captured:
            result = read_and_render(*args)
        queries.append(len(captured))
        return result

    hub._read_and_render = counting
    renders, ticks = hub.renders, hub.ticks
    await write_progress(job, percent=55.5)
    for comm in watchers:
        await receive_until(comm, "55.5 %")
    # On Redis the pushed row was rendered (no read); the poller's tick follows it.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while hub.ticks == ticks and loop.time() < deadline:
        await asyncio.sleep(0.05)
    # 25 watchers, one job, one language: rendered once; a handful of ticks, not 25;
    # each tick is the job query plus the event-log query, whoever watches.
    assert hub.renders - renders == 1
    assert queries and max(queries) == 2, queries
    assert hub.ticks - ticks < 10
    for comm in watchers:
        await comm.disconnect()
    await asyncio.sleep(0.3)
    assert hub.watcher_count == 0 and not hub.is_polling
    # The next watcher starts a new poller (lazily), still exactly one.
    comm = await connected(f"/ws/jobs/{job.pk}/", operator)
    await comm.receive_from(timeout=TIMEOUT)
    assert hub.poller_starts == 2 and hub.is_polling
    await comm.disconnect()


async def test_it_streams_job_states_to_lists_within_scope(jobs, operator, alice):
    alice_job, bob_job = jobs["alice"], jobs["bob"]
    staff = await connected("/ws/jobs/", operator)
    own = await connected("/ws/jobs/", alice)
    snapshot = await staff.receive_from(timeout=TIMEOUT)
    assert f'id="job-row-{alice_job.pk}"' in snapshot and f'id="job-row-{bob_job.pk}"' in snapshot
    snapshot = await own.receive_from(timeout=TIMEOUT)
    assert f'id="job-row-{alice_job.pk}"' in snapshot and f'id="job-row-{bob_job.pk}"' not in snapshot
    await asyncio.sleep(0.2)
    await write_progress(bob_job, status=MigrationJob.FAILED, error="boom")
    text = await receive_until(staff, ">failed<")
    assert f'id="job-row-{bob_job.pk}"' in text
    assert await own.receive_nothing(timeout=0.5)  # bob's job is not alice's business
    await write_progress(alice_job, status=MigrationJob.SUCCEEDED)
    text = await receive_until(own, ">succeeded<")
    assert f'id="job-row-{alice_job.pk}"' in text and f"job-row-{bob_job.pk}" not in text
    await staff.disconnect()
    await own.disconnect()


async def test_it_gives_a_late_watcher_everything_so_far(jobs, operator):
    job = jobs["bob"]
    early = await connected(f"/ws/jobs/{job.pk}/", operator)
    await early.receive_from(timeout=TIMEOUT)
    await add_event(job, "phase: memory iteration 2")
    await write_progress(job, percent=80.0)
    await receive_until(early, "80.0 %")
    late = await connected(f"/ws/jobs/{job.pk}/", operator)
    text = await late.receive_from(timeout=TIMEOUT)
    assert "80.0 %" in text and "phase: memory iteration 2" in text and "started bob-vm" in text
    await early.disconnect()
    await late.disconnect()


async def test_it_renders_in_the_watchers_language(jobs, operator):
    job = jobs["bob"]
    comm = await communicator(f"/ws/jobs/{job.pk}/", operator)
    comm.scope["headers"].append((b"accept-language", b"zh-CN,zh;q=0.9"))
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    text = await comm.receive_from(timeout=TIMEOUT)
    assert 'lang="' not in text  # a fragment, not a page
    with_zh = text
    en = await connected(f"/ws/jobs/{job.pk}/", operator)
    text_en = await en.receive_from(timeout=TIMEOUT)
    # The rate is 0: Django's own catalog says "0 bytes" / "0 字节".
    assert "0\xa0bytes/s" in text_en and "字节" not in text_en
    assert "字节/s" in with_zh and "bytes/s" not in with_zh
    await comm.disconnect()
    await en.disconnect()


async def test_it_ends_streams_when_the_session_or_the_scope_ends(jobs, alice, bob, monkeypatch):
    monkeypatch.setattr(streaming, "RECHECK_INTERVAL", 0.2)
    job = jobs["alice"]
    kept = await connected(f"/ws/jobs/{job.pk}/", alice)
    signed_out = await connected(f"/ws/jobs/{job.pk}/", alice)
    for comm in (kept, signed_out):
        await comm.receive_from(timeout=TIMEOUT)
    await asyncio.sleep(0.6)  # a few re-checks pass: both stay open
    for comm in (kept, signed_out):
        while not comm.output_queue.empty():
            assert comm.output_queue.get_nowait()["type"] == "websocket.send"

    @database_sync_to_async
    def sign_out(comm):
        from django.contrib.sessions.models import Session

        cookie = dict(comm.scope["headers"])[b"cookie"].decode().split("=", 1)[1]
        Session.objects.filter(session_key=cookie).delete()

    await sign_out(signed_out)
    await assert_closed_with(signed_out, 4401)
    # The VM is given to bob: alice's other socket closes, telling nothing more.
    # (Updates may still arrive until the next re-check, at most RECHECK_INTERVAL later.)
    await database_sync_to_async(VM.objects.filter(pk=job.vm_id).update)(owner_user=bob)
    message = await kept.receive_output(timeout=TIMEOUT)
    while message["type"] == "websocket.send":
        message = await kept.receive_output(timeout=TIMEOUT)
    assert message == {"type": "websocket.close", "code": 4404}
    assert streaming.get_hub().watcher_count == 0
    await write_progress(job, percent=90.0)
    assert await kept.receive_nothing(timeout=0.5)


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="the Redis channel layer only (scale-out pass)")
async def test_it_keeps_an_idle_watcher_connected_on_redis(jobs, operator):
    """redis-py 8's default 5 s socket timeout killed every idle consumer's channel-layer
    receive (daphne then dropped the socket); kvmweb/settings.py turns it off."""
    job = jobs["bob"]
    comm = await connected(f"/ws/jobs/{job.pk}/", operator)
    await comm.receive_from(timeout=TIMEOUT)
    await asyncio.sleep(7)
    await write_progress(job, percent=33.3)
    await receive_until(comm, "33.3 %")
    await comm.disconnect()


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="the Redis channel layer only (scale-out pass)")
async def test_it_renders_the_pushed_row_without_reading_the_job(jobs, operator):
    """On Redis publish_job carries the committed row: the hub renders the progress from
    it (JobHub._push) and the poller's read that follows renders it no second time."""
    job = jobs["bob"]
    hub = streaming.get_hub()
    comm = await connected(f"/ws/jobs/{job.pk}/", operator)
    await comm.receive_from(timeout=TIMEOUT)
    await settled(hub)
    pushes, renders = hub.pushes, hub.renders
    await write_progress(job, percent=47.5)
    await receive_until(comm, "47.5 %")
    assert hub.pushes == pushes + 1
    await settled(hub)  # the poller's tick after the push
    assert hub.renders == renders + 1
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


async def test_it_narrows_a_list_when_its_watcher_loses_a_role(jobs, operator, monkeypatch):
    monkeypatch.setattr(streaming, "RECHECK_INTERVAL", 0.2)
    comm = await connected("/ws/jobs/", operator)
    await comm.receive_from(timeout=TIMEOUT)
    await database_sync_to_async(operator.groups.clear)()
    await asyncio.sleep(0.6)  # a re-check or two
    while not comm.output_queue.empty():
        comm.output_queue.get_nowait()
    await write_progress(jobs["bob"], status=MigrationJob.FAILED)
    await write_progress(jobs["alice"], status=MigrationJob.FAILED)
    assert await comm.receive_nothing(timeout=0.6)  # no role, no rows
    await comm.disconnect()


async def test_it_escapes_names_in_live_fragments(jobs, operator):
    job = jobs["bob"]
    await database_sync_to_async(MigrationJob.objects.filter(pk=job.pk).update)(
        vm_name="<script>alert(1)</script>", error="<img src=x onerror=alert(2)>"
    )
    detail = await connected(f"/ws/jobs/{job.pk}/", operator)
    rows = await connected("/ws/jobs/", operator)
    texts = [await detail.receive_from(timeout=TIMEOUT), await rows.receive_from(timeout=TIMEOUT)]
    await write_progress(job, status=MigrationJob.FAILED)
    texts.append(await receive_until(detail, 'data-status="failed"'))
    texts.append(await receive_until(rows, ">failed<"))
    for text in texts:
        assert "<script>alert(1)" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in texts[3]
    assert "&lt;img src=x onerror=alert(2)&gt;" in texts[2]
    await detail.disconnect()
    await rows.disconnect()


async def test_it_ends_streams_when_the_password_changes(jobs, alice, monkeypatch):
    """A password change ends the user's other sessions for pages (Django checks the
    session's auth hash on every request) although their rows stay: a watcher on such a
    session is closed at the next re-check too, not streamed to for as long as it lives."""
    monkeypatch.setattr(streaming, "RECHECK_INTERVAL", 0.2)
    job = jobs["alice"]
    comm = await connected(f"/ws/jobs/{job.pk}/", alice)
    await comm.receive_from(timeout=TIMEOUT)

    @database_sync_to_async
    def change_password():
        alice.set_password("a-new-long-password-42")
        alice.save()

    await change_password()
    message = await comm.receive_output(timeout=TIMEOUT)
    while message["type"] == "websocket.send":
        message = await comm.receive_output(timeout=TIMEOUT)
    assert message == {"type": "websocket.close", "code": 4401}
    assert streaming.get_hub().watcher_count == 0

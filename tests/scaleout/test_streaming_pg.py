"""Progress across processes: a worker-side write + publish_job reaches browsers connected
to OTHER daphne processes through Redis, and a browser that missed a message (or was not
connected) catches up from the database.

The "worker" here is this test process: it writes the job row exactly like the runner does
(progress fields, progress_seq + 1, heartbeat) and calls streaming.publish_job(), which
with REDIS_URL set goes through channels-redis. Two real daphne processes serve the
WebSockets against the same PostgreSQL and Redis.
"""

import asyncio
import re
import secrets
import time
import uuid

import pytest
from django.db import connections
from django.db.models import F
from django.utils import timezone

from hosts.models import VM, Host
from migrations_app import streaming
from migrations_app.models import MigrationJob
from tests.scaleout.wsclient import Closed, WebSocket

pytestmark = pytest.mark.django_db(transaction=True)
# Generous bound for one delivery. The slow-poll daphnes poll once a minute, so anything
# well under that can only have come through Redis.
DELIVERY_TIMEOUT = 15.0
SEQ = re.compile(r'data-seq="(\d+)"')


def make_job():
    a = Host.objects.create(name=f"so-a-{secrets.token_hex(3)}", uri=f"test:///so-a-{secrets.token_hex(3)}")
    b = Host.objects.create(name=f"so-b-{secrets.token_hex(3)}", uri=f"test:///so-b-{secrets.token_hex(3)}")
    vm = VM.objects.create(uuid=uuid.uuid4(), name=f"so-vm-{secrets.token_hex(3)}", host=a)
    return MigrationJob.objects.create(
        vm=vm,
        vm_name=vm.name,
        source=a,
        source_name=a.name,
        target=b,
        target_name=b.name,
        mode=MigrationJob.LIVE,
        status=MigrationJob.RUNNING,
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        phase="memory",
        memory_total=1 << 30,
        data_total=1 << 30,
    )


def write_progress(job_id, marker, publish=True):
    """What the runner does per sample; in a thread (no ORM on the event loop), whose
    connection is closed afterwards (an open one would block dropping the test DB)."""
    try:
        now = timezone.now()
        MigrationJob.objects.filter(pk=job_id).update(
            phase=marker,
            percent=F("percent") + 1,
            progress_at=now,
            heartbeat_at=now,
            progress_seq=F("progress_seq") + 1,
        )
        seq = MigrationJob.objects.values_list("progress_seq", flat=True).get(pk=job_id)
        if publish:
            streaming.publish_job(job_id)
        return seq, time.monotonic()
    finally:
        connections.close_all()


def session_cookie(client, user):
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value}


async def open_watcher(port, job_id, cookies):
    ws = await WebSocket.connect("127.0.0.1", port, f"/ws/jobs/{job_id}/", cookies=cookies)
    snapshot = await asyncio.wait_for(ws.recv(), DELIVERY_TIMEOUT)
    return ws, int(SEQ.search(snapshot).group(1))


async def wait_for_seq(ws, seq, marker=None):
    """Read messages until one carries progress_seq >= seq; returns (text, monotonic time)."""
    while True:
        text = await ws.recv()
        found = SEQ.search(text)
        if found and int(found.group(1)) >= seq:
            if marker is not None:
                assert marker in text
            return text, time.monotonic()


def test_it_pushes_a_workers_progress_to_watchers_on_two_other_daphne_processes(
    processes, client, operator, capsys
):
    job = make_job()
    cookies = session_cookie(client, operator)
    a = processes.daphne("daphne-a", DJANGO_SETTINGS_MODULE="tests.scaleout.settings_slowpoll")
    b = processes.daphne("daphne-b", DJANGO_SETTINGS_MODULE="tests.scaleout.settings_slowpoll")

    async def scenario():
        (wa, seq_a), (wb, seq_b) = await asyncio.gather(
            open_watcher(a.port, job.pk, cookies), open_watcher(b.port, job.pk, cookies)
        )
        assert seq_a == seq_b == job.progress_seq
        await asyncio.sleep(1.0)  # both hubs have joined the job's Redis group
        latencies = []
        for i in range(5):
            marker = f"scaleout-{i}-{secrets.token_hex(3)}"
            seq, t0 = await asyncio.to_thread(write_progress, job.pk, marker)
            (_, ta), (_, tb) = await asyncio.wait_for(
                asyncio.gather(wait_for_seq(wa, seq, marker), wait_for_seq(wb, seq, marker)), DELIVERY_TIMEOUT
            )
            latencies += [ta - t0, tb - t0]
        await wa.close()
        await wb.close()
        return latencies

    try:
        latencies = asyncio.run(scenario())
    except (TimeoutError, Closed) as exc:
        pytest.fail(f"an update did not arrive through Redis: {exc!r}\n{processes.logs()}")
    with capsys.disabled():
        print(
            f"\n  cross-process delivery via Redis: max {max(latencies) * 1000:.0f} ms over {len(latencies)}"
        )


def test_it_catches_up_from_the_database_when_no_message_comes(processes, client, operator):
    """No publish at all (a lost message): the per-process poller still finds the change
    (default settings: one DB read per second when a channel layer exists)."""
    job = make_job()
    cookies = session_cookie(client, operator)
    d = processes.daphne("daphne-default")

    async def scenario():
        ws, seq0 = await open_watcher(d.port, job.pk, cookies)
        marker = f"silent-{secrets.token_hex(3)}"
        seq, _ = await asyncio.to_thread(write_progress, job.pk, marker, False)
        assert seq == seq0 + 1
        text, _ = await asyncio.wait_for(wait_for_seq(ws, seq, marker), DELIVERY_TIMEOUT)
        await ws.close()
        return text

    try:
        text = asyncio.run(scenario())
    except TimeoutError:
        pytest.fail(f"the poller did not catch up from the database\n{processes.logs()}")
    assert f'data-job="{job.pk}"' in text


def test_it_gives_a_reconnecting_browser_the_latest_state(processes, client, operator):
    """A browser that was away while updates (published ones too) went out gets the
    current row as its first message after reconnecting, on either daphne process."""
    job = make_job()
    cookies = session_cookie(client, operator)
    a = processes.daphne("daphne-a")
    b = processes.daphne("daphne-b")

    async def scenario():
        ws, seq0 = await open_watcher(a.port, job.pk, cookies)
        await ws.close()
        last = None
        for i in range(3):
            last, _ = await asyncio.to_thread(write_progress, job.pk, f"away-{i}", i % 2 == 0)
        ws, seq_b = await open_watcher(b.port, job.pk, cookies)
        await ws.close()
        return seq0, last, seq_b

    seq0, last, seq_b = asyncio.run(scenario())
    assert last == seq0 + 3
    assert seq_b == last
    job.refresh_from_db()
    assert job.phase == "away-2"


def test_it_refuses_a_watcher_without_a_session_on_every_process(processes, operator):
    job = make_job()
    a = processes.daphne("daphne-a")

    async def scenario():
        ws = await WebSocket.connect("127.0.0.1", a.port, f"/ws/jobs/{job.pk}/")
        with pytest.raises(Closed) as closed:
            await asyncio.wait_for(ws.recv(), DELIVERY_TIMEOUT)
        return closed.value.code

    assert asyncio.run(scenario()) == 4401


def test_it_still_pushes_through_redis_after_the_last_watcher_left_and_new_ones_came(
    processes, client, operator
):
    """A daphne process's hub stops its poller and Redis listener when its last watcher
    leaves and starts them again for the next one. The restarted listener must receive
    again: with a one-minute poll, only Redis can deliver within the bound."""
    job = make_job()
    cookies = session_cookie(client, operator)
    d = processes.daphne("daphne-slowpoll", DJANGO_SETTINGS_MODULE="tests.scaleout.settings_slowpoll")

    async def one_cycle(i):
        ws, _seq = await open_watcher(d.port, job.pk, cookies)
        await asyncio.sleep(1.0)  # the hub joined the job's group
        marker = f"cycle-{i}-{secrets.token_hex(3)}"
        seq, _ = await asyncio.to_thread(write_progress, job.pk, marker)
        await asyncio.wait_for(wait_for_seq(ws, seq, marker), DELIVERY_TIMEOUT)
        await ws.close()
        await asyncio.sleep(1.5)  # the hub noticed: poller and listener stopped

    async def scenario():
        for i in range(3):
            await one_cycle(i)

    try:
        asyncio.run(scenario())
    except TimeoutError:
        pytest.fail(f"after a watcher cycle the Redis wake-up no longer arrived\n{processes.logs()}")

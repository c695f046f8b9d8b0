"""The bell live through the job hub (ws/notifications/, notifications/live.py): the user's
own bell first, then a new bell when a job of theirs ends or a host in their scope goes
away or comes back; nobody hears of another user's items or of hosts outside their
scope; anonymous sockets are closed 4401; the hub's poller stops with the last bell."""

import asyncio
import time

import pytest
import pytest_asyncio
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.models import Session
from django.db import OperationalError, connections, transaction
from django.test import Client

from hosts import services as host_services
from hosts.models import VM, Host
from kvmweb.asgi import application
from kvmweb.audit import record
from migrations_app import services as migration_services
from migrations_app import streaming
from migrations_app.models import MigrationJob
from notifications import live

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
TIMEOUT = 30  # a backstop: every wait below ends as soon as its message arrives


@pytest_asyncio.fixture(autouse=True)
async def fast_poll(monkeypatch):
    monkeypatch.setattr(streaming, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(live, "MIN_INTERVAL", 0.05)
    yield
    await database_sync_to_async(connections.close_all)()
    await streaming.close_poller_db()


@pytest.fixture
def world(alice, bob):
    """Host ha carries alice's VM; host hb carries bob's; alice has a running job."""
    ha = Host.objects.create(name="ha", uri="test:///default", status=Host.REACHABLE)
    hb = Host.objects.create(name="hb", uri="test:///other", status=Host.REACHABLE)
    vms = {}
    for i, (name, host, owner) in enumerate((("alice-web", ha, alice), ("bob-db", hb, bob))):
        vms[name] = VM.objects.create(
            uuid=f"6695eb01-f6a4-8304-79aa-{i + 1:012d}",
            name=name,
            host=host,
            state="running",
            owner_user=owner,
        )
    jobs = {}
    for name, owner, source, target in (("alice-web", alice, ha, hb), ("bob-db", bob, hb, ha)):
        jobs[name] = MigrationJob.objects.create(
            vm=vms[name],
            vm_name=name,
            source=source,
            source_name=source.name,
            target=target,
            target_name=target.name,
            mode="live",
            status=MigrationJob.RUNNING,
            requested_by=owner,
            requested_by_name=owner.username,
        )
    return {"ha": ha, "hb": hb, "jobs": jobs}


def _cookie(user):
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def _connect(user=None):
    headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1")]
    if user is not None:
        headers.append((b"cookie", f"sessionid={await database_sync_to_async(_cookie)(user)}".encode()))
    comm = WebsocketCommunicator(application, "/ws/notifications/", headers=headers)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    return comm


async def _until(comm, needle):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        text = await comm.receive_from(timeout=max(0.01, deadline - loop.time()))
        if needle in text:
            return text


async def _drain(comm, settle=1.0):
    """Everything the socket got so far (after letting the poller run ``settle`` s),
    read without a receive timeout (a timeout would end the application)."""
    await asyncio.sleep(settle)
    out = []
    while not comm.output_queue.empty():
        out.append(comm.output_queue.get_nowait().get("text", ""))
    return out


@database_sync_to_async
def _write(fn):
    """Run a write; the in-memory SQLite test database refuses a writer at once while the
    poller thread reads ("table is locked"): retry like a busy timeout would."""
    for attempt in range(50):
        try:
            with transaction.atomic():
                return fn()
        except OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.02)


def _finish(job, status):
    MigrationJob.objects.filter(pk=job.pk).update(status=status)
    record("migration.finish", target=job, details={"status": status})


async def _settled(feed):
    """True once the feed has read the audit history twice with no watcher left to render
    (the snapshots' catch-up renders are behind us)."""
    start = feed.reads
    for _ in range(500):
        if feed.reads >= start + 2 and not feed.dirty:
            return True
        await asyncio.sleep(0.02)
    return False


async def _hub_stops():
    hub = streaming.get_hub()
    for _ in range(250):
        if not hub.is_polling:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_it_pushes_a_users_own_job_end_and_nobody_elses(world, alice, bob):
    a, b = await _connect(alice), await _connect(bob)
    first = await a.receive_from(timeout=TIMEOUT)
    assert 'id="bell"' in first and 'hx-swap-oob="outerHTML"' in first and "bell-count" not in first
    await b.receive_from(timeout=TIMEOUT)
    feed = live.get_feed()
    assert await _settled(feed)
    renders = feed.renders
    await _write(lambda: _finish(world["jobs"]["alice-web"], MigrationJob.FAILED))
    text = await _until(a, "alice-web")
    assert 'data-unread="1"' in text and "failed" in text and 'data-testid="bell-count">1<' in text
    assert feed.renders == renders + 1  # a job's end re-reads its requester's inbox only
    assert not any("alice-web" in t for t in await _drain(b))  # bob's bell did not change
    await _write(lambda: _finish(world["jobs"]["bob-db"], MigrationJob.SUCCEEDED))
    assert "bob-db" in await _until(b, "bob-db")
    assert not any("bob-db" in t for t in await _drain(a))
    await a.disconnect()
    await b.disconnect()
    assert await _hub_stops()


async def test_it_tells_users_whose_scope_has_the_host_when_it_goes_and_comes_back(
    world, alice, bob, operator
):
    a, b, o = await _connect(alice), await _connect(bob), await _connect(operator)
    for comm in (a, b, o):
        await comm.receive_from(timeout=TIMEOUT)
    ha = world["ha"]
    # The health probe (hosts/services.py) finds the host gone, then back.
    await _write(lambda: Host.objects.filter(pk=ha.pk).update(uri="test:///no/such/node.xml"))
    assert not await _write(lambda: host_services.do_probe_host(Host.objects.get(pk=ha.pk)))
    assert "Host ha is unreachable." in await _until(a, "Host ha")
    assert "Host ha is unreachable." in await _until(o, "Host ha")
    await _write(lambda: Host.objects.filter(pk=ha.pk).update(uri="test:///default"))
    assert await _write(lambda: host_services.do_probe_host(Host.objects.get(pk=ha.pk)))
    text = await _until(a, "reachable again")
    assert 'data-unread="2"' in text and f'href="/hosts/{ha.pk}/"' in text
    # bob has nothing on ha and may not move there: not a word about it.
    assert not any("Host ha" in t for t in await _drain(b))
    for comm in (a, b, o):
        await comm.disconnect()


async def test_it_closes_anonymous_and_signed_out_sockets(world, alice, monkeypatch):
    anonymous = await _connect()
    assert await anonymous.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    monkeypatch.setattr(streaming, "RECHECK_INTERVAL", 0.2)
    comm = await _connect(alice)
    await comm.receive_from(timeout=TIMEOUT)
    await _write(lambda: Session.objects.all().delete())
    assert await comm.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    assert await _hub_stops()


async def test_it_costs_one_small_read_per_interval_while_nothing_happens(world, alice):
    comm = await _connect(alice)
    await comm.receive_from(timeout=TIMEOUT)
    feed = live.get_feed()

    assert await _settled(feed)
    renders = feed.renders
    assert await _settled(feed)
    assert feed.renders == renders  # read the newest audit id, rendered nothing
    assert await _drain(comm, settle=0) == []
    await comm.disconnect()


async def test_it_takes_a_request_off_the_approvers_bell_when_it_is_cancelled(world, alice, operator):
    """A request cancelled (or whose window passed) while waiting for approval leaves the
    approvers' bells at once, not at the next unrelated event."""

    def request():
        job = world["jobs"]["alice-web"]
        MigrationJob.objects.filter(pk=job.pk).update(status=MigrationJob.PENDING_APPROVAL)
        record("migration.request", actor=alice, target=job, details={"status": "pending_approval"})

    await _write(request)
    o = await _connect(operator)
    assert "waiting for your approval" in await o.receive_from(timeout=TIMEOUT)
    assert await _settled(live.get_feed())
    job = await database_sync_to_async(MigrationJob.objects.get)(pk=world["jobs"]["alice-web"].pk)
    await _write(lambda: migration_services.do_cancel_job(job, alice))
    assert (
        await database_sync_to_async(MigrationJob.objects.get)(pk=job.pk)
    ).status == MigrationJob.CANCELLED
    text = await _until(o, 'id="bell"')
    assert "waiting for your approval" not in text and "bell-count" not in text
    await o.disconnect()

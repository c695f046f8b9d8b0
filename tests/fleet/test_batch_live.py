"""The batch page live through the job hub (ws/batches/<id>/, fleet/live.py): snapshot
first, then the aggregate and rows as children start and end; same scope rule and close
codes as the job sockets; the hub's one poller serves it and stops with the last watcher."""

import asyncio
import time

import pytest
import pytest_asyncio
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.models import Session
from django.db import OperationalError, connections
from django.test import Client

from fleet import live, scheduler, services
from fleet.models import Batch
from fleet.planner import make_plan
from hosts.models import VM
from kvmweb.asgi import application
from migrations_app import streaming
from migrations_app.models import MigrationJob

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
def batch(fleet, make_vm, operator, fake_preflight):
    for i in range(3):
        make_vm(f"vm{i}")
    plan = make_plan(VM.objects.filter(host=fleet["ha"]), operator, measure_dirty_rate=False)
    return services.do_create_batch(plan, operator, host=fleet["ha"])


def _cookie(user):
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def _connect(path, user=None):
    headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1")]
    if user is not None:
        headers.append((b"cookie", f"sessionid={await database_sync_to_async(_cookie)(user)}".encode()))
    comm = WebsocketCommunicator(application, path, headers=headers)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    return comm


async def _close_code(comm):
    """The code the socket is closed with, after any updates sent before it."""
    message = await comm.receive_output(timeout=TIMEOUT)
    while message.get("type") != "websocket.close":
        message = await comm.receive_output(timeout=TIMEOUT)
    return message["code"]


async def _until(comm, needle):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        text = await comm.receive_from(timeout=max(0.01, deadline - loop.time()))
        if needle in text:
            return text


@database_sync_to_async
def _write(fn):
    """Run a write. The test database is in-memory SQLite with a shared cache, where a
    reader (the hub's poller thread) makes a writer fail at once with "table is locked"
    instead of waiting: retry like a busy timeout would."""
    for attempt in range(50):
        try:
            return fn()
        except OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.02)


def _tick(batch_id):
    """A scheduler pass (one owner: a retried pass keeps the lease it took)."""
    return _write(lambda: scheduler.tick(batch_id, "test-scheduler"))


async def _hub_stops():
    hub = streaming.get_hub()
    for _ in range(250):
        if not hub.is_polling:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_it_pushes_the_aggregate_and_rows_as_children_start_and_end(batch, operator):
    comm = await _connect(f"/ws/batches/{batch.pk}/", operator)
    first = await comm.receive_from(timeout=TIMEOUT)
    assert f'id="batch-live-{batch.pk}" hx-swap-oob="true"' in first and "0 of 3 done" in first
    # The scheduler starts children (another process in real life: only the DB changes).
    await _tick(batch.pk)
    jobs = await database_sync_to_async(lambda: list(MigrationJob.objects.order_by("pk")))()
    assert jobs
    text = await _until(comm, f"#{jobs[0].pk}")
    assert 'data-testid="batch-item"' in text
    # A child ends and the next pass follows it: the aggregate moves.
    await _write(lambda: MigrationJob.objects.filter(pk=jobs[0].pk).update(status=MigrationJob.SUCCEEDED))
    await _tick(batch.pk)
    await _until(comm, "1 of 3 done")
    await comm.disconnect()
    assert await _hub_stops()


async def test_it_closes_sockets_out_of_scope_like_the_job_sockets(batch, operator, alice, monkeypatch):
    anonymous = await _connect(f"/ws/batches/{batch.pk}/")
    assert await anonymous.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4401}
    for path, user in ((f"/ws/batches/{batch.pk}/", alice), ("/ws/batches/987654/", operator)):
        comm = await _connect(path, user)  # self-service users see no batch; a missing one
        assert await comm.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4404}
    assert streaming.get_hub().watcher_count == 0
    # Signing out ends a stream that was in scope, at the next recheck.
    monkeypatch.setattr(streaming, "RECHECK_INTERVAL", 0.2)
    comm = await _connect(f"/ws/batches/{batch.pk}/", operator)
    await comm.receive_from(timeout=TIMEOUT)
    await _write(lambda: Session.objects.all().delete())
    await _write(lambda: Batch.objects.filter(pk=batch.pk).update(waiting_for="x"))
    assert await _close_code(comm) == 4401
    assert await _hub_stops()


async def test_it_closes_a_batch_socket_when_its_users_password_changes(batch, operator, monkeypatch):
    """The session row stays after a password change but no longer signs the user in
    (as for pages): the batch socket on it is closed at the next recheck."""
    monkeypatch.setattr(streaming, "RECHECK_INTERVAL", 0.2)
    comm = await _connect(f"/ws/batches/{batch.pk}/", operator)
    await comm.receive_from(timeout=TIMEOUT)

    def change_password():
        operator.set_password("a-new-long-password-42")
        operator.save()

    await _write(change_password)
    await _write(lambda: Batch.objects.filter(pk=batch.pk).update(waiting_for="x"))
    assert await _close_code(comm) == 4401
    assert await _hub_stops()

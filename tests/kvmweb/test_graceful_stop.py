"""A real `python -m kvmweb.serve` stops promptly on SIGTERM while a browser watches a job
over a WebSocket and a request is still in its view (kvmweb/serve.py GracefulServer):

- the WebSocket is closed with 1012 "service restart", one of the codes after which
  htmx's ws extension reconnects (1001 "going away" is not: the page would stay
  disconnected; tests/e2e/test_browser.py restarts the server under a page);
- the request in flight is answered, not dropped;
- the process exits within a generous bound. Before, daphne stopped its event loop under
  the request's worker thread, which then waited for it forever, and the exit waited for
  that thread: the server never exited until killed.
"""

import asyncio
import json
import signal
import subprocess
import time

import pytest

from tests.scaleout.wsclient import Closed, WebSocket
from tests.sites import Site

EXIT_LIMIT = 15  # seconds from SIGTERM; the server needs ~2 (the slow view's own time)
SETUP = """
import json, uuid
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone
from hosts.models import VM, Host
from migrations_app.models import MigrationJob
user = User.objects.create_superuser("watcher", "w@example.test", "a long enough passphrase 42")
a = Host.objects.create(name="stop-a", uri="test:///stop-a")
b = Host.objects.create(name="stop-b", uri="test:///stop-b")
vm = VM.objects.create(uuid=uuid.uuid4(), name="stop-vm", host=a)
job = MigrationJob.objects.create(
    vm=vm, vm_name=vm.name, source=a, source_name=a.name, target=b, target_name=b.name,
    mode=MigrationJob.LIVE, status=MigrationJob.RUNNING, started_at=timezone.now(),
    heartbeat_at=timezone.now(), phase="memory",
)
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
print(json.dumps([session.session_key, job.pk]))
"""


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


def wait_until(check, what, site, timeout=60):
    deadline = time.monotonic() + timeout
    while not check():
        assert site.web.poll() is None, f"the server exited early\n{site.logs()}"
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s\n{site.logs()}"
        time.sleep(0.05)


def test_it_closes_sockets_going_away_answers_requests_in_flight_and_exits(site):
    session_key, job_id = site.python(SETUP)
    site.start_web(env={"DJANGO_SETTINGS_MODULE": "tests.kvmweb.settings_slowview"})
    entered = site.dir / "slow-entered"

    async def scenario():
        ws = await WebSocket.connect(
            "127.0.0.1", site.port, f"/ws/jobs/{job_id}/", cookies={"sessionid": session_key}, origin=site.url
        )
        snapshot = await asyncio.wait_for(ws.recv(), 60)
        assert f'data-job="{job_id}"' in snapshot  # watching: the hub's poller runs
        slow = asyncio.create_task(asyncio.to_thread(site.request, "GET", "/test-slow/"))
        await asyncio.to_thread(wait_until, entered.exists, "the slow view", site)
        started = time.monotonic()
        site.web.send_signal(signal.SIGTERM)
        with pytest.raises(Closed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), EXIT_LIMIT)
        try:
            await asyncio.to_thread(site.web.wait, EXIT_LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs {EXIT_LIMIT} s after SIGTERM\n{site.logs()}")
        took = time.monotonic() - started
        status, _headers, body = await asyncio.wait_for(slow, EXIT_LIMIT)
        return closed.value.code, took, status, body

    code, took, status, body = asyncio.run(scenario())
    assert code == 1012  # service restart: htmx's ws extension reconnects
    assert (status, body) == (200, "finished")
    assert site.web.returncode == 0
    assert took < EXIT_LIMIT
    print(json.dumps({"seconds_to_exit": round(took, 2)}))

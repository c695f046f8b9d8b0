"""/health/ on the scale-out stack: served by a real daphne process, database on
PostgreSQL, the channel-layer round trip through Redis, and the heartbeat tasks run by
real default and migrations clusters."""

import json
import time
import urllib.error
import urllib.request

import pytest
from django_q.tasks import async_task

from kvmweb import health

pytestmark = pytest.mark.django_db(transaction=True)


def get_health(port, query=""):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/{query}", timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_it_reports_the_whole_scaleout_stack_healthy_once_both_clusters_beat(processes):
    web = processes.daphne("daphne")
    status, body = get_health(web.port)
    assert status == 503
    assert body["database"] == "ok"
    assert body["channel_layer"] == "ok"  # a round trip through Redis from inside daphne
    assert body["workers"]["default"] == {"status": "stale", "last_seen": None}
    assert get_health(web.port, "?scope=web")[0] == 200

    clusters = [processes.qcluster("default"), processes.qcluster("migrations")]
    # What each cluster's heartbeat schedule enqueues (the scheduler itself only looks
    # every ~30 s; ensure_heartbeat_schedules is covered in tests/kvmweb/test_health.py).
    async_task(health.HEARTBEAT_FUNC)
    async_task(health.HEARTBEAT_FUNC, cluster="migrations")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = get_health(web.port)
        if status == 200:
            break
        if any(c.poll() is not None for c in clusters):
            pytest.fail(f"a qcluster died\n{processes.logs()}")
        time.sleep(0.5)
    else:
        pytest.fail(f"never healthy: {body}\n{processes.logs()}")
    assert body["status"] == "ok"
    assert body["workers"]["default"]["status"] == "ok"
    assert body["workers"]["migrations"]["status"] == "ok"
    assert body["workers"]["default"]["last_seen"] and body["workers"]["migrations"]["last_seen"]

"""/health/ on the embedded setup (SQLite, in-process channel layer). The PostgreSQL +
Redis version is tests/scaleout/test_health_scaleout.py."""

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone
from django_q.models import Schedule, Task

from hosts.models import VM, Host
from kvmweb import health
from migrations_app.models import MigrationJob

pytestmark = pytest.mark.django_db
KEYS = {"status", "database", "channel_layer", "workers"}


def beat(cluster, age=timedelta(0)):
    """A finished heartbeat task row, as django-q2's monitor saves it."""
    at = timezone.now() - age
    return Task.objects.create(
        id=uuid.uuid4().hex,
        name=f"beat-{uuid.uuid4().hex[:8]}",
        func=health.HEARTBEAT_FUNC,
        cluster=cluster,
        started=at,
        stopped=at,
        success=True,
    )


def test_it_reports_healthy_when_both_clusters_beat_recently(client):
    beat("kvmweb")
    beat("migrations", timedelta(seconds=30))
    response = client.get("/health/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == KEYS
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["channel_layer"] == "ok"
    assert set(body["workers"]) == {"default", "migrations"}
    assert body["workers"]["default"]["status"] == "ok"
    assert body["workers"]["migrations"]["status"] == "ok"
    assert response["Cache-Control"].startswith("max-age=0")


def test_it_needs_no_login_and_reveals_no_inventory(client, admin):
    Host.objects.create(name="secret-host", uri="test:///default")
    beat("kvmweb")
    beat("migrations")
    response = client.get("/health/")
    assert response.status_code == 200
    assert b"secret-host" not in response.content
    assert b"test:///" not in response.content
    assert "sessionid" not in response.cookies


def test_it_is_unhealthy_when_a_cluster_was_never_seen(client):
    beat("kvmweb")
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error"
    assert body["workers"]["migrations"] == {"status": "stale", "last_seen": None}
    assert body["workers"]["default"]["status"] == "ok"


def test_it_is_unhealthy_when_a_cluster_stopped_beating(client):
    beat("kvmweb", timedelta(minutes=10))
    beat("migrations")
    body = client.get("/health/").json()
    assert body["workers"]["default"]["status"] == "stale"
    assert body["workers"]["default"]["last_seen"] is not None
    assert body["status"] == "error"


def test_it_judges_only_the_web_side_with_scope_web(client):
    response = client.get("/health/?scope=web")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    # The workers are still reported, they just do not decide the status code.
    assert body["workers"]["default"]["status"] == "stale"


def test_it_counts_a_running_jobs_heartbeat_as_the_migrations_cluster_seen(client):
    beat("kvmweb")
    beat("migrations", timedelta(minutes=30))  # busy for half an hour with one long job
    host = Host.objects.create(name="h1", uri="test:///default")
    vm = VM.objects.create(uuid=uuid.uuid4(), name="v1", host=host)
    MigrationJob.objects.create(
        vm=vm,
        vm_name="v1",
        source=host,
        source_name="h1",
        target_name="h2",
        mode=MigrationJob.LIVE,
        status=MigrationJob.RUNNING,
        heartbeat_at=timezone.now(),
    )
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json()["workers"]["migrations"]["status"] == "ok"


def test_it_reports_a_database_error_without_details(client, monkeypatch):
    def broken():
        raise RuntimeError("connection to server at 10.1.2.3 failed: password authentication")

    monkeypatch.setattr(connection, "cursor", broken)
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "error"
    assert body["workers"]["default"]["status"] == "unknown"
    assert b"10.1.2.3" not in response.content
    assert b"password" not in response.content


def test_it_reports_a_channel_layer_that_does_not_answer(client):
    beat("kvmweb")
    beat("migrations")
    # Port 9 (discard) on loopback: nothing listens, the round trip fails quickly.
    layers = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]},
        }
    }
    with override_settings(CHANNEL_LAYERS=layers):
        response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["channel_layer"] == "error"
    assert body["database"] == "ok"
    assert b"127.0.0.1:9" not in response.content


def test_it_refuses_other_methods(client):
    assert client.post("/health/").status_code == 405


def test_it_answers_head_for_load_balancers(client):
    beat("kvmweb")
    beat("migrations")
    assert client.head("/health/").status_code == 200
    assert client.head("/health/?scope=web").status_code == 200


def test_it_never_touches_libvirt(client, monkeypatch):
    from hosts import hypervisor

    def forbidden(*args, **kwargs):
        raise AssertionError("health must not call libvirt")

    monkeypatch.setattr(hypervisor, "connect", forbidden)
    monkeypatch.setattr(hypervisor, "session", forbidden)
    Host.objects.create(name="h1", uri="test:///default")
    assert client.get("/health/?scope=web").status_code == 200


def test_it_creates_one_heartbeat_schedule_per_cluster_idempotently():
    assert health.ensure_heartbeat_schedules() == ["health-heartbeat-default", "health-heartbeat-migrations"]
    health.ensure_heartbeat_schedules()
    schedules = {s.name: s for s in Schedule.objects.filter(func=health.HEARTBEAT_FUNC)}
    assert set(schedules) == {"health-heartbeat-default", "health-heartbeat-migrations"}
    # The default cluster's scheduler only takes schedules without a cluster name.
    assert schedules["health-heartbeat-default"].cluster is None
    assert schedules["health-heartbeat-migrations"].cluster == "migrations"
    assert all(s.minutes == 1 and s.repeats == -1 for s in schedules.values())


def test_it_prunes_only_its_own_clusters_old_heartbeats(monkeypatch):
    from django_q.conf import Conf

    old_here = beat("kvmweb", timedelta(hours=1))
    new_here = beat("kvmweb")
    old_there = beat("migrations", timedelta(hours=1))
    monkeypatch.setattr(Conf, "CLUSTER_NAME", "kvmweb")
    assert health.heartbeat() == "ok"
    left = set(Task.objects.values_list("id", flat=True))
    assert old_here.id not in left
    assert {new_here.id, old_there.id} <= left

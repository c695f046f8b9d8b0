"""/metrics: who may read it, and that it counts what happened (from the database and from
every process's multiprocess files)."""

import asyncio
import re
import uuid

import pytest
from django.test import Client
from django.utils import timezone

from hosts.models import VM, Host
from migrations_app.models import MigrationJob

pytestmark = pytest.mark.django_db
REMOTE = {"REMOTE_ADDR": "203.0.113.5"}


def sample(text, name, **labels):
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not match or match[1] != name:
            continue
        have = ",".join(sorted((match[3] or "").split(","))) if match[3] else ""
        if have == want:
            return float(match[4])
    return 0.0


def scrape(client=None, **extra):
    response = (client or Client()).get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def _job(vm, host, status, **fields):
    return MigrationJob.objects.create(
        vm=vm,
        vm_name=vm.name,
        source=host,
        source_name=host.name,
        target=host,
        target_name=host.name,
        mode=fields.pop("mode", MigrationJob.LIVE),
        status=status,
        finished_at=timezone.now() if status in MigrationJob.FINAL_STATES else None,
        **fields,
    )


def test_it_counts_jobs_hosts_and_audit_events_from_the_database(admin):
    a = Host.objects.create(name="up-host", uri="test:///default", status=Host.REACHABLE)
    Host.objects.create(name="down-host", uri="test:///x", status=Host.UNREACHABLE)

    def vm():
        return VM.objects.create(uuid=uuid.uuid4(), name=f"vm-{uuid.uuid4().hex[:6]}", host=a)

    _job(vm(), a, MigrationJob.SUCCEEDED, elapsed_ms=4000, downtime_ms=80, data_processed=1000)
    _job(vm(), a, MigrationJob.SUCCEEDED, elapsed_ms=45000, downtime_ms=400, data_processed=500)
    _job(vm(), a, MigrationJob.FAILED, mode=MigrationJob.COLD, data_processed=7)
    _job(vm(), a, MigrationJob.QUEUED)
    _job(vm(), a, MigrationJob.RUNNING)
    text = scrape()
    assert sample(text, "kvmweb_migrations_total", mode="live", outcome="succeeded") == 2
    assert sample(text, "kvmweb_migrations_total", mode="cold", outcome="failed") == 1, text
    assert sample(text, "kvmweb_migration_bytes_total", mode="live") == 1500
    assert sample(text, "kvmweb_migration_duration_seconds_bucket", mode="live", le="5.0") == 1
    assert sample(text, "kvmweb_migration_duration_seconds_bucket", mode="live", le="60.0") == 2
    assert sample(text, "kvmweb_migration_duration_seconds_count", mode="live") == 2
    assert sample(text, "kvmweb_migration_duration_seconds_sum", mode="live") == 49.0
    assert sample(text, "kvmweb_migration_downtime_seconds_bucket", mode="live", le="0.1") == 1
    assert sample(text, "kvmweb_migration_downtime_seconds_bucket", mode="live", le="0.5") == 2
    assert sample(text, "kvmweb_migration_jobs", status="queued") == 1
    assert sample(text, "kvmweb_migration_jobs", status="running") == 1
    assert sample(text, "kvmweb_host_up", host="up-host") == 1
    assert sample(text, "kvmweb_host_up", host="down-host") == 0
    assert sample(text, "kvmweb_hosts", status="unreachable") == 1
    from kvmweb.audit import record

    before = sample(text, "kvmweb_audit_events_total", outcome="success")
    record("test.event", actor=admin)
    assert sample(scrape(), "kvmweb_audit_events_total", outcome="success") == before + 1


def test_it_refuses_remote_callers_without_a_metrics_token(alice, auditor, token_for, settings):
    refused = Client().get("/metrics", **REMOTE)
    assert refused.status_code == 401 and "kvmweb_" not in refused.content.decode()
    bad = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer kvmweb_nope_nope", **REMOTE)
    assert bad.status_code == 401
    self_service = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}", **REMOTE)
    assert self_service.status_code == 403
    scrape(HTTP_AUTHORIZATION=f"Bearer {token_for(auditor)}", **REMOTE)
    settings.METRICS_ALLOW = ["203.0.113.0/24"]
    scrape(**REMOTE)


def test_it_judges_the_client_behind_a_proxy_by_the_forwarded_address(settings):
    """Behind the proxy every request comes from loopback: the proxy's X-Forwarded-For
    decides, or anyone could read /metrics through it."""
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    response = Client().get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert response.status_code == 401
    scrape(HTTP_X_FORWARDED_FOR="127.0.0.1")


def test_it_counts_preflight_failures_by_check(operator, api):
    Host.objects.create(name="gone-src", uri="test:///nowhere-src.xml")
    src = Host.objects.get(name="gone-src")
    dst = Host.objects.create(name="gone-dst", uri="test:///nowhere-dst.xml")
    vm = VM.objects.create(uuid=uuid.uuid4(), name="vm-p", host=src, state=VM.RUNNING)
    before = sample(scrape(), "kvmweb_preflight_failures_total", check="connection", source="api")
    report = api(operator).post(
        "/api/v1/preflight/",
        {"vm": vm.pk, "target": dst.pk, "mode": "live", "quick": True},
        content_type="application/json",
    )
    assert report.status_code == 200
    assert {"id": "connection", "status": "fail"}.items() <= report.json()["results"][0].items()
    text = scrape()
    assert sample(text, "kvmweb_preflight_failures_total", check="connection", source="api") == before + 1
    assert sample(text, "kvmweb_preflight_runs_total", verdict="fail", source="api") >= 1


def test_it_counts_the_dry_run_pages_preflight_failures(operator, login):
    """The dry-run page is in the migrations app, which cannot import the API: it announces
    its run (migrations_app.signals.py) and the metrics count it."""
    src = Host.objects.create(name="dry-src", uri="test:///nowhere-dry-src.xml")
    dst = Host.objects.create(name="dry-dst", uri="test:///nowhere-dry-dst.xml")
    vm = VM.objects.create(uuid=uuid.uuid4(), name="vm-dry", host=src, state=VM.RUNNING)
    labels = {"check": "connection", "source": "dry_run"}
    before = sample(scrape(), "kvmweb_preflight_failures_total", **labels)
    page = login(operator).get(f"/migrations/preflight/?vm={vm.pk}&target={dst.pk}&mode=live")
    assert page.status_code == 200 and 'data-verdict="fail"' in page.content.decode()
    assert sample(scrape(), "kvmweb_preflight_failures_total", **labels) == before + 1


def test_it_counts_open_websocket_watchers():
    from api.metrics import WatcherCount

    seen = {}
    before = sample(scrape(), "kvmweb_websocket_watchers")
    from asgiref.sync import sync_to_async

    def during():
        from django.db import connection

        try:
            return sample(scrape(), "kvmweb_websocket_watchers")
        finally:
            connection.close()  # this worker thread's own connection

    async def inner(scope, receive, send):
        seen["during"] = await sync_to_async(during, thread_sensitive=False)()

    asyncio.run(WatcherCount(inner)({"type": "websocket"}, None, None))
    assert seen["during"] == before + 1
    assert sample(scrape(), "kvmweb_websocket_watchers") == before

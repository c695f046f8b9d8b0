"""A migration's audit events, opened on the audit page: the plan, the checklist and the
final statistics, as the job services and the runner write them."""

import pytest
from django.urls import reverse
from django.utils.html import escape

from kvmweb.audit.models import AuditEvent
from migrations_app import services as job_services
from migrations_app.models import MigrationJob
from migrations_app.preflight import CheckResult, Report
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


def test_it_shows_the_plan_checklist_and_virsh_line_of_a_request(login, operator, auditor, alice, bob):
    w = build(alice, bob)
    report = Report(
        results=[
            CheckResult("memory", "Free memory on the target", "pass", "4096 MiB free, 2048 MiB needed"),
            CheckResult("cache", "Disk cache mode", "warn", "cache=writeback", remedy="Use cache=none"),
        ],
        verdict="warn",
        started_at="2026-11-25T21:00:00+00:00",
        duration_ms=120,
        plan={
            "vm": {"id": w.alice_web.pk, "name": "alice-web"},
            "mode": "live",
            "options": {"bandwidth": 50},
        },
    )
    job = job_services.do_create_job(
        w.alice_web, w.d1, "live", {"bandwidth": 50}, actor=operator, report=report, acknowledged=["cache"]
    )
    event = AuditEvent.objects.get(action="migration.request", target_id=str(job.pk))
    body = login(auditor).get(reverse("audit:detail", args=[event.pk])).content.decode()
    assert "Plan" in body and "Preflight" in body
    assert "Free memory on the target" in body and "4096 MiB free, 2048 MiB needed" in body
    assert "Use cache=none" in body
    # The equivalent virsh command, from the plan.
    assert "Equivalent virsh command" in body and "migrate --live --p2p --persistent" in body
    assert job.status == MigrationJob.QUEUED and escape(str(job)) in body


def test_it_shows_the_final_statistics_of_a_finished_job(login, auditor, operator, alice, bob):
    from django.db import transaction

    from kvmweb.audit import record

    w = build(alice, bob)
    job = MigrationJob.objects.create(
        vm=w.alice_web,
        vm_name="alice-web",
        source=w.p1,
        source_name=w.p1.name,
        target=w.d1,
        target_name=w.d1.name,
        mode=MigrationJob.LIVE,
        status=MigrationJob.SUCCEEDED,
        downtime_ms=87,
        elapsed_ms=5400,
        result={"data_processed": 123456789, "memory_iteration": 3},
    )
    with transaction.atomic():
        event = record(
            "migration.finish",
            target=job,
            details={"status": "succeeded", "downtime_ms": 87, "result": job.result},
        )
    body = login(auditor).get(reverse("audit:detail", args=[event.pk])).content.decode()
    assert "Final statistics" in body and "123456789" in body and "memory_iteration" in body
    assert "Job result" in body  # the job row's own figures, linked from the event

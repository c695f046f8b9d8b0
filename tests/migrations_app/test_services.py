"""Job requests, approval, cancel and controls as service calls: DB rows, constraint,
queueing and audit events. The checklist report is given (as the wizard hands it over),
so no host is contacted here; the lab tests run the same path against real libvirt."""

import pytest
from django.db import IntegrityError, transaction
from django_q.models import OrmQ

from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.audit.models import AuditEvent
from migrations_app import services
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.preflight import CheckResult, Report


def _report(*results):
    results = list(results) or [CheckResult("connection", "Connections", "pass", "ok")]
    return Report(results=results, verdict=Report.verdict_of(results), started_at="", duration_ms=1)


def test_it_creates_a_queued_job_and_enqueues_it_after_the_commit(
    world, operator, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        job = services.do_create_job(
            world["vm"], world["b"], "live", {"bandwidth": 16}, actor=operator, report=_report()
        )
    # The message is queued after the commit, and the pusher woken after that one's.
    assert [c.__qualname__ for c in callbacks] == [
        "enqueue.<locals>.push",
        "WakeableORM.enqueue.<locals>.<lambda>",
    ]
    assert job.status == MigrationJob.QUEUED and job.options["bandwidth"] == 16
    assert job.options["undefine_source"] is True  # normalized by the plan
    assert job.preflight["verdict"] == "pass" and job.requested_by == operator
    message = OrmQ.objects.get()
    assert message.key == "migrations" and message.task["args"] == (job.pk,)
    event = AuditEvent.objects.get(action="migration.request")
    assert event.outcome == AuditEvent.SUCCESS and "--bandwidth 16" in event.details["virsh"]


def test_it_refuses_a_second_active_job_for_the_same_vm(world, operator):
    first = services.do_create_job(world["vm"], world["b"], "live", {}, actor=operator, report=_report())
    with pytest.raises(services.JobError) as err:
        services.do_create_job(world["vm"], world["b"], "live", {}, actor=operator, report=_report())
    assert err.value.active_job == first and f"#{first.pk}" in str(err.value)
    assert MigrationJob.objects.count() == 1


def test_it_lets_the_database_enforce_one_active_job_per_vm(world, operator):
    services.do_create_job(world["vm"], world["b"], "live", {}, actor=operator, report=_report())
    fields = dict(vm=world["vm"], vm_name="web1", source_name="ha", target_name="hb", mode="live")
    with pytest.raises(IntegrityError), transaction.atomic():
        MigrationJob.objects.create(status=MigrationJob.RUNNING, **fields)
    MigrationJob.objects.create(status=MigrationJob.FAILED, **fields)  # finished ones do not count


def test_it_blocks_on_an_unacknowledged_warning_and_audits_the_refusal(world, operator):
    warn = CheckResult("prediction", "Duration", "warn", "slow")
    with pytest.raises(services.JobError) as err:
        services.do_create_job(world["vm"], world["b"], "live", {}, actor=operator, report=_report(warn))
    assert "Not acknowledged" in str(err.value)
    assert not MigrationJob.objects.exists()
    assert AuditEvent.objects.get(action="migration.request").outcome == AuditEvent.FAILURE
    job = services.do_create_job(
        world["vm"], world["b"], "live", {}, actor=operator, report=_report(warn), acknowledged=["prediction"]
    )
    assert job.acknowledged == ["prediction"]


def test_it_lets_only_administrators_override_a_failed_check(world, operator, admin):
    fail = CheckResult("memory", "Memory", "fail", "tight", overridable=True)
    with pytest.raises(services.JobError):
        services.do_create_job(
            world["vm"], world["b"], "live", {}, actor=operator, report=_report(fail), overridden=["memory"]
        )
    job = services.do_create_job(
        world["vm"], world["b"], "live", {}, actor=admin, report=_report(fail), overridden=["memory"]
    )
    assert job.overridden == ["memory"] and job.status == MigrationJob.QUEUED


def test_it_refuses_a_plan_libvirt_would_refuse(world, operator):
    with pytest.raises(services.JobError, match="needs a shut-off VM"):
        services.do_create_job(world["vm"], world["b"], "offline", {}, actor=operator, report=_report())


def test_it_parks_a_self_service_request_for_approval_then_approves_it(world, alice, operator):
    policy = SelfServicePolicy.objects.create(
        source_group=world["g1"], allowed_modes=["live"], requires_approval=True
    )
    policy.target_groups.add(world["g2"])
    job = services.do_create_job(world["vm"], world["b"], "live", {}, actor=alice, report=_report())
    assert job.status == MigrationJob.PENDING_APPROVAL
    assert not OrmQ.objects.exists()
    services.do_approve_job(job, operator)
    job.refresh_from_db()
    assert job.status == MigrationJob.QUEUED and job.approved_by == operator
    with pytest.raises(services.JobError):
        services.do_reject_job(job, operator, "too late")  # someone decided first
    assert AuditEvent.objects.filter(action="migration.approve").count() == 1


def test_it_rejects_a_request_with_a_reason(world, alice, operator):
    policy = SelfServicePolicy.objects.create(
        source_group=world["g1"], allowed_modes=["live"], requires_approval=True
    )
    policy.target_groups.add(world["g2"])
    job = services.do_create_job(world["vm"], world["b"], "live", {}, actor=alice, report=_report())
    services.do_reject_job(job, operator, "not during business hours")
    job.refresh_from_db()
    assert job.status == MigrationJob.REJECTED and job.reason == "not during business hours"
    assert AuditEvent.objects.get(action="migration.reject").details["reason"] == "not during business hours"
    # a rejected job is not active: a new request is possible
    services.do_create_job(world["vm"], world["b"], "live", {}, actor=alice, report=_report())


def test_it_refuses_a_self_service_request_outside_the_policy(world, alice):
    with pytest.raises(services.JobError, match="No self-service policy"):
        services.do_create_job(world["vm"], world["b"], "live", {}, actor=alice, report=_report())
    assert AuditEvent.objects.get(action="migration.request").outcome == AuditEvent.DENIED
    assert not MigrationJob.objects.exists()


def test_it_turns_controls_into_requests_for_the_worker(world, operator):
    job = services.do_create_job(
        world["vm"], world["b"], "live", {"postcopy": True}, actor=operator, report=_report()
    )
    with pytest.raises(services.JobError):
        services.do_set_bandwidth(job, 32, operator)  # queued, not running yet
    MigrationJob.objects.filter(pk=job.pk).update(status=MigrationJob.RUNNING)
    services.do_set_bandwidth(job, 32, operator)
    services.do_set_downtime(job, 200, operator)
    services.do_switch_postcopy(job, operator)
    job.refresh_from_db()
    assert (job.requested_bandwidth, job.requested_downtime, job.postcopy_requested) == (32, 200, True)
    actions = list(AuditEvent.objects.filter(outcome="success").values_list("action", flat=True))
    assert {"migration.bandwidth", "migration.downtime", "migration.postcopy"} <= set(actions)
    assert JobEvent.objects.filter(job=job).count() == 4  # requested + three controls
    services.do_cancel_job(job, operator)
    job.refresh_from_db()
    assert job.status == MigrationJob.CANCELLING and job.cancel_requested

"""Self-service requests: refused with the reason outside policy, parked for approval
inside it; operators approve (the job is queued) or reject with a reason the requester sees."""

import pytest
from django.urls import reverse

from kvmweb.audit.models import AuditEvent
from migrations_app import services as job_services
from migrations_app.models import MigrationJob
from migrations_app.preflight import Report
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return build(alice, bob)


def clean_report():
    """A checklist with nothing blocking (the checks themselves are the preflight tests')."""
    return Report(results=[], verdict="pass", started_at="", duration_ms=0)


def request_as(user, vm, target, mode="live", **options):
    return job_services.do_create_job(vm, target, mode, options, actor=user, report=clean_report())


@pytest.fixture
def pending(world, alice):
    return request_as(alice, world.alice_web, world.d1, bandwidth=50)


def test_it_refuses_a_request_outside_policy_with_the_reason(world, alice):
    with pytest.raises(job_services.JobError) as info:
        request_as(alice, world.alice_web, world.d1, bandwidth=500)
    assert str(info.value) == "The bandwidth 500 MiB/s is above the allowed 100 MiB/s."
    assert not MigrationJob.objects.exists()
    event = AuditEvent.objects.get(action="migration.request")
    assert event.outcome != AuditEvent.SUCCESS and event.actor == alice
    assert event.details["error"] == str(info.value)


def test_it_refuses_a_target_outside_policy_without_naming_it(world, alice):
    with pytest.raises(job_services.JobError) as info:
        request_as(alice, world.alice_web, world.s1, bandwidth=50)
    assert "s1-secret" not in str(info.value) and "secret" not in str(info.value)
    assert not MigrationJob.objects.exists()


def test_it_parks_a_request_that_needs_approval(pending, world, alice):
    assert pending.status == MigrationJob.PENDING_APPROVAL and pending.requested_by == alice
    event = AuditEvent.objects.get(action="migration.request")
    assert event.outcome == AuditEvent.SUCCESS and event.details["status"] == MigrationJob.PENDING_APPROVAL


def test_it_queues_at_once_when_the_policy_needs_no_approval(world, alice):
    world.policy.requires_approval = False
    world.policy.save()
    job = request_as(alice, world.alice_web, world.d1, bandwidth=50)
    assert job.status == MigrationJob.QUEUED


def test_it_lists_waiting_requests_for_operators(pending, login, operator, admin, auditor):
    for user in (operator, admin):
        response = login(user).get(reverse("migrations:approvals"))
        assert response.status_code == 200 and list(response.context["jobs"]) == [pending]
        assert "alice-web" in response.content.decode()
        # The navigation shows how many wait.
        assert 'Approvals <span class="badge pending_approval">1</span>' in response.content.decode()
    assert "Approvals" not in login(auditor).get(reverse("dashboard")).content.decode()


def test_it_starts_the_job_when_an_operator_approves(pending, login, operator):
    response = login(operator).post(reverse("migrations:approve", args=[pending.pk]))
    assert response.status_code == 302
    pending.refresh_from_db()
    assert pending.status == MigrationJob.QUEUED and pending.approved_by == operator
    event = AuditEvent.objects.get(action="migration.approve")
    assert event.actor == operator and event.target_id == str(pending.pk)
    # A second click (or a second operator) does not approve twice.
    login(operator).post(reverse("migrations:approve", args=[pending.pk]))
    assert AuditEvent.objects.filter(action="migration.approve").count() == 1


def test_it_rejects_with_a_reason_the_requester_sees(pending, world, login, operator, alice):
    client = login(operator)
    client.post(reverse("migrations:reject", args=[pending.pk]), {"reason": ""})
    pending.refresh_from_db()
    assert pending.status == MigrationJob.PENDING_APPROVAL  # a reason is required
    client.post(reverse("migrations:reject", args=[pending.pk]), {"reason": "Freeze until Monday"})
    pending.refresh_from_db()
    assert pending.status == MigrationJob.REJECTED and pending.reason == "Freeze until Monday"
    event = AuditEvent.objects.get(action="migration.reject")
    assert event.actor == operator and event.details["reason"] == "Freeze until Monday"
    client = login(alice)
    body = client.get(reverse("hosts:vm_detail", args=[world.alice_web.pk])).content.decode()
    assert "Freeze until Monday" in body and "rejected" in body
    assert "rejected" in client.get(reverse("migrations:list")).content.decode()
    assert (
        "Freeze until Monday" in client.get(reverse("migrations:detail", args=[pending.pk])).content.decode()
    )


def test_it_lets_nobody_else_decide(pending, login, alice, bob, auditor, mallory):
    cases = [(alice, 403), (auditor, 403), (bob, 404), (mallory, 404)]
    for user, status in cases:
        client = login(user)
        assert client.post(reverse("migrations:approve", args=[pending.pk])).status_code == status
        assert (
            client.post(reverse("migrations:reject", args=[pending.pk]), {"reason": "x"}).status_code
            == status
        )
        assert client.get(reverse("migrations:approvals")).status_code == 403
    pending.refresh_from_db()
    assert pending.status == MigrationJob.PENDING_APPROVAL
    assert not AuditEvent.objects.filter(action__in=["migration.approve", "migration.reject"]).exists()


def test_it_shows_the_refusal_reason_in_the_wizard(world, login, alice, monkeypatch):
    from migrations_app import preflight

    monkeypatch.setattr(preflight, "run_preflight", lambda plan, **kw: clean_report())
    data = {"vm": world.alice_web.pk, "target": world.d1.pk, "mode": "live", "options": '{"bandwidth": 500}'}
    response = login(alice).post(reverse("migrations:new"), data)
    assert response.status_code == 400
    assert "The bandwidth 500 MiB/s is above the allowed 100 MiB/s." in response.content.decode()
    assert not MigrationJob.objects.exists()
    data["options"] = '{"bandwidth": 80}'
    response = login(alice).post(reverse("migrations:new"), data)
    job = MigrationJob.objects.get()
    assert response.status_code == 302 and job.status == MigrationJob.PENDING_APPROVAL

"""The migration pages: wizard steps, job creation through the wizard, job list, job page
and controls; scope (404) and capability (403) rules.

The wizard's preflight talks to real hosts, so the wizard tests run on the lab; the job
list/page and control tests need no host at all.
"""

import json

import pytest
from django.urls import reverse

from hosts import services as host_services
from hosts.models import VM, Host
from kvmweb.audit.models import AuditEvent
from migrations_app.models import JobEvent, MigrationJob


def _job(vm, status=MigrationJob.RUNNING, mode=MigrationJob.LIVE, **kw):
    source = vm.host
    target = Host.objects.exclude(pk=source.pk).first()
    return MigrationJob.objects.create(
        vm=vm,
        vm_name=vm.name,
        source=source,
        source_name=source.name,
        target=target,
        target_name=target.name,
        mode=mode,
        status=status,
        **kw,
    )


@pytest.fixture
def vm(db, alice):
    a = Host.objects.create(name="ha", uri="test:///default")
    Host.objects.create(name="hb", uri="test:///other")
    return VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web1", host=a, state="running", owner_user=alice
    )


def test_it_shows_the_job_list_and_page_with_controls_to_an_operator(vm, operator, login):
    job = _job(vm, options={"postcopy": True})
    client = login(operator)
    page = client.get(reverse("migrations:list"))
    assert page.status_code == 200 and b"web1" in page.content
    detail = client.get(reverse("migrations:detail", args=[job.pk]))
    assert detail.status_code == 200
    assert detail.context["can_cancel"] and detail.context["can_control"]
    assert b"Switch to post-copy" in detail.content


def test_it_lets_an_auditor_read_but_not_control(vm, auditor, login):
    job = _job(vm)
    client = login(auditor)
    detail = client.get(reverse("migrations:detail", args=[job.pk]))
    assert (
        detail.status_code == 200 and not detail.context["can_cancel"] and not detail.context["can_control"]
    )
    assert client.post(reverse("migrations:cancel", args=[job.pk])).status_code == 403
    job.refresh_from_db()
    assert job.status == MigrationJob.RUNNING and not job.cancel_requested


def test_it_hides_other_peoples_jobs_from_self_service_users(vm, bob, alice, login):
    job = _job(vm)
    assert login(bob).get(reverse("migrations:detail", args=[job.pk])).status_code == 404
    assert login(bob).post(reverse("migrations:cancel", args=[job.pk])).status_code == 404
    assert login(alice).get(reverse("migrations:detail", args=[job.pk])).status_code == 200


def test_it_records_a_cancel_request_for_a_running_job(vm, operator, login):
    job = _job(vm)
    response = login(operator).post(reverse("migrations:cancel", args=[job.pk]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == MigrationJob.CANCELLING and job.cancel_requested
    event = AuditEvent.objects.get(action="migration.cancel")
    assert event.actor == operator and event.outcome == AuditEvent.SUCCESS
    assert JobEvent.objects.filter(job=job, message__startswith="Cancel requested").exists()


def test_it_cancels_a_queued_job_at_once(vm, alice, login):
    job = _job(vm, status=MigrationJob.QUEUED)
    login(alice).post(reverse("migrations:cancel", args=[job.pk]))
    job.refresh_from_db()
    assert job.status == MigrationJob.CANCELLED and job.finished_at is not None


def test_it_records_bandwidth_and_downtime_changes(vm, operator, login):
    job = _job(vm)
    client = login(operator)
    client.post(reverse("migrations:bandwidth", args=[job.pk]), {"bandwidth": "64"})
    client.post(reverse("migrations:downtime", args=[job.pk]), {"downtime": "250"})
    job.refresh_from_db()
    assert job.requested_bandwidth == 64 and job.requested_downtime == 250
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"migration.bandwidth", "migration.downtime"} <= actions


def test_it_refuses_post_copy_when_it_was_not_enabled(vm, operator, login):
    job = _job(vm)
    login(operator).post(reverse("migrations:postcopy", args=[job.pk]))
    job.refresh_from_db()
    assert not job.postcopy_requested
    assert not AuditEvent.objects.filter(action="migration.postcopy").exists()


def test_it_refuses_controls_on_a_finished_job_and_audits_the_failure(vm, operator, login):
    job = _job(vm, status=MigrationJob.SUCCEEDED)
    login(operator).post(reverse("migrations:bandwidth", args=[job.pk]), {"bandwidth": "10"})
    job.refresh_from_db()
    assert job.requested_bandwidth is None
    assert AuditEvent.objects.get(action="migration.bandwidth").outcome == AuditEvent.FAILURE


def test_it_keeps_mallory_out_of_the_wizard(db, mallory, login):
    assert login(mallory).get(reverse("migrations:new")).status_code == 403


def test_it_hides_vms_outside_the_scope_in_the_wizard(vm, bob, login):
    assert login(bob).get(reverse("migrations:new"), {"vm": vm.pk}).status_code == 404


# ------------------------------------------------------------------ wizard on the lab


@pytest.mark.lab
def test_it_walks_the_wizard_and_creates_exactly_one_job(lab, lab_guest, db, operator, login):
    a = host_services.do_register_host("lab-a", lab.uri("lab-a"))
    b = host_services.do_register_host("lab-b", lab.uri("lab-b"))
    guest = lab_guest("mj-wiz", running=False)
    host_services.do_sync_inventory(a)
    vm = VM.objects.get(uuid=guest.uuid)
    client = login(operator)
    url = reverse("migrations:new")
    assert b"pick-vm-" + guest.name.encode() in client.get(url).content
    step2 = client.get(url, {"vm": vm.pk})
    assert step2.context["step"] == "target" and [h.name for h, _r in step2.context["ranked"]][0] == "lab-b"
    step3 = client.get(url, {"vm": vm.pk, "target": b.pk})
    assert step3.context["step"] == "options" and step3.context["form"]["mode"].initial == "offline"
    step4 = client.get(
        url,
        {
            "vm": vm.pk,
            "target": b.pk,
            "step": "preflight",
            "mode": "offline",
            "persist": "on",
            "undefine_source": "on",
        },
    )
    assert step4.status_code == 200, step4.context.get("error")
    assert "--offline --persistent --undefinesource" in step4.context["plan"].virsh_command()
    report = step4.context["report"]
    post = {
        "vm": vm.pk,
        "target": b.pk,
        "mode": "offline",
        "options": step4.context["options_json"],
        "ack": [r.id for r in report.warnings],
    }
    # Between reading the checklist and confirming, somebody starts the VM: the confirm
    # checks again what can change and refuses on the wizard's page; no job.
    domain = lab.conn("lab-a").lookupByName(guest.name)
    domain.create()
    try:
        refused = client.post(url, post)
    finally:
        domain.destroy()
    assert refused.status_code == 400 and not MigrationJob.objects.filter(vm=vm).exists()
    assert "blocks this migration" in refused.context["error"]
    audit = AuditEvent.objects.get(action="migration.request", outcome=AuditEvent.FAILURE)
    assert any(r.startswith("VM state") for r in audit.details["blocking"]), audit.details
    # The refusal showed the checklist of that moment; the user reads it again (shut off
    # again now) and confirms.
    reread = client.get(url, step4.wsgi_request.GET).context["report"]
    assert reread.result("vm_state").status == "pass"
    first = client.post(url, post)
    job = MigrationJob.objects.get(vm=vm)
    assert first.status_code == 302 and first.url == reverse("migrations:detail", args=[job.pk])
    assert job.status == MigrationJob.QUEUED and job.requested_by == operator
    # The confirm's re-check is stored for the worker (it stands in when claimed within
    # seconds): the static checks taken from the checklist read, the others run again.
    assert job.preflight["at_request"] and "storage" in job.preflight["reused"]
    assert job.preflight["reused_from"] == reread.started_at  # as old as the checklist read
    assert "vm_state" not in job.preflight["reused"]
    assert json.loads(step4.context["options_json"])["undefine_source"] is True
    second = client.post(url, post)  # a double click
    assert second.status_code == 302 and second.url == reverse("migrations:detail", args=[job.pk])
    assert MigrationJob.objects.filter(vm=vm).count() == 1
    request = AuditEvent.objects.get(action="migration.request", outcome=AuditEvent.SUCCESS)
    assert request.details["preflight"]["verdict"] in ("pass", "warn")

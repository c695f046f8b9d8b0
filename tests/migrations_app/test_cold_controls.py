"""A cold move waiting for its guest to shut down: the stored deadline and countdown,
"Force off now" (who may, audit, the worker picking it up as the journaled force_off
step), "Try again with …" prefilled, the job page's steps, and the guest_shutdown check.

The shutdown wait runs against a scripted source (a guest that never shuts down), so no
host is needed; the lab proof is in test_jobs_lab.py."""

import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.audit.models import AuditEvent
from migrations_app import services
from migrations_app.jobrun import Failed, JobRun
from migrations_app.journal import Journal
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.modes import cold
from migrations_app.preflight.checks.devices import check_guest_shutdown


@pytest.fixture
def vm(db, alice):
    prod = HostGroup.objects.create(name="prod")
    a = Host.objects.create(name="ha", uri="test:///default", group=prod)
    Host.objects.create(name="hb", uri="test:///other")
    return VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e1940", name="web1", host=a, state="running", owner_user=alice
    )


def _cold(vm, status=MigrationJob.RUNNING, **kw):
    target = Host.objects.exclude(pk=vm.host_id).first()
    fields = {
        "phase": "shutdown",
        "shutdown_deadline": timezone.now() + timedelta(seconds=90),
        "eta_seconds": 90,
        "options": {"shutdown_timeout": 120, "force_off": False, "start_on_target": True},
    }
    fields.update(kw)
    return MigrationJob.objects.create(
        vm=vm,
        vm_name=vm.name,
        source=vm.host,
        source_name=vm.host.name,
        target=target,
        target_name=target.name,
        mode=MigrationJob.COLD,
        status=status,
        **fields,
    )


def test_it_records_force_off_now_for_an_operator_and_audits_it(vm, operator, login):
    job = _cold(vm)
    response = login(operator).post(reverse("migrations:force_off", args=[job.pk]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.force_off_requested and job.force_off_requested_by == operator.username
    event = AuditEvent.objects.get(action="migration.force_off")
    assert event.actor == operator and event.outcome == AuditEvent.SUCCESS
    assert JobEvent.objects.filter(job=job, message__contains="force the guest off now").exists()
    # Asked twice (or too late): refused, and the refusal is audited.
    with pytest.raises(services.JobError):
        services.do_force_off_now(job, operator)
    assert AuditEvent.objects.filter(action="migration.force_off", outcome=AuditEvent.FAILURE).count() == 1


def test_it_refuses_force_off_once_the_guest_is_off(vm, operator):
    job = _cold(vm, phase="disk copy")
    with pytest.raises(services.JobError, match="no longer waiting"):
        services.do_force_off_now(job, operator)
    job.refresh_from_db()
    assert not job.force_off_requested
    assert AuditEvent.objects.get(action="migration.force_off").outcome == AuditEvent.FAILURE


def test_it_lets_the_owner_force_off_only_when_their_policy_allows_cold(vm, alice, bob, auditor, login):
    job = _cold(vm)
    url = reverse("migrations:force_off", args=[job.pk])
    assert login(auditor).post(url).status_code == 403
    assert login(bob).post(url).status_code == 404  # not his VM: out of scope
    assert login(alice).post(url).status_code == 403  # no policy covers the VM
    policy = SelfServicePolicy.objects.create(
        source_group=vm.host.group, allowed_modes=["live"], requires_approval=False
    )
    assert login(alice).post(url).status_code == 403  # the policy does not allow cold moves
    policy.allowed_modes = ["live", "cold"]
    policy.save()
    page = login(alice).get(reverse("migrations:detail", args=[job.pk]))
    assert page.context["can_force_off"] and b'data-testid="job-force-off"' in page.content
    assert login(alice).post(url).status_code == 302
    job.refresh_from_db()
    assert job.force_off_requested_by == "alice"
    assert AuditEvent.objects.get(action="migration.force_off", outcome=AuditEvent.SUCCESS).actor == alice


def test_it_shows_the_countdown_to_the_stored_deadline(vm, operator, auditor, login):
    job = _cold(vm)
    page = login(operator).get(reverse("migrations:detail", args=[job.pk]))
    html = page.content.decode()
    assert f'data-deadline="{job.shutdown_deadline.timestamp():.3f}"' in html
    assert 'data-testid="job-countdown"' in html and "then the move fails" in html
    assert 'data-testid="job-force-off"' in html
    assert 'data-testid="job-force-off"' not in login(auditor).get(page.request["PATH_INFO"]).content.decode()


class _StubbornGuest:
    """A source whose guest never shuts down (it ignores ACPI). ``on_poll(n)`` runs at
    each state poll of the shutdown wait (the n-th), in the worker's own thread."""

    def __init__(self, on_poll=None):
        self.destroyed = False
        self.asked = 0
        self.polls = 0
        self.on_poll = on_poll

    def shutdown(self, uuid):
        self.asked += 1

    def find_domain(self, uuid):
        self.polls += 1
        if self.on_poll:
            self.on_poll(self.polls)
        return ("shutoff", "destroyed") if self.destroyed else ("running", "booted")

    def destroy(self, uuid):
        self.destroyed = True


def test_it_forces_the_guest_off_when_asked_during_the_wait(vm, operator):
    job = _cold(vm, phase="", shutdown_deadline=None)

    def ask(n):
        if n == 3:  # a few polls into the wait, as a person clicking the button would
            services.do_force_off_now(MigrationJob.objects.get(pk=job.pk), operator)

    run, journal, src = JobRun(job, "w1"), Journal.load(job.pk), _StubbornGuest(ask)
    started = time.monotonic()
    cold.shutdown(run, journal, src, str(vm.uuid), {"shutdown_timeout": 30, "force_off": False})
    took = time.monotonic() - started
    assert src.destroyed and src.asked == 1 and src.polls == 3
    assert took < 25  # the wait ended at the request, not at the 30 s timeout
    job.refresh_from_db()
    # Out of the shutdown phase: no countdown, no "Force off now" button any more.
    assert job.shutdown_deadline is None and job.eta_seconds is None and job.phase == "moving"
    assert not job.is_shutting_down
    forced = [e for e in job.journal if e["step"] == "force_off"]
    assert [e["state"] for e in forced] == ["started", "done"] and forced[0]["asked_by"] == operator.username
    assert JobEvent.objects.filter(job=job, code="forced_off_now").exists()
    assert ("forced off", "done", "") in [
        (str(label), state, path) for label, state, path in job.journal_steps
    ]


class _ShutsDownAtTheLastMoment(_StubbornGuest):
    """The guest reaches shut off between the last poll and the forced power-off: libvirt
    answers "domain is not running" to the destroy."""

    def destroy(self, uuid):
        from hosts.hypervisor import HypervisorError

        self.destroyed = True  # it is off now, but not by this call
        raise HypervisorError("Requested operation is not valid: domain is not running")


def test_it_goes_on_when_the_guest_shut_down_just_before_the_forced_power_off(vm, operator):
    job = _cold(vm, phase="", shutdown_deadline=None)
    run, journal, src = JobRun(job, "w1"), Journal.load(job.pk), _ShutsDownAtTheLastMoment()
    cold.shutdown(run, journal, src, str(vm.uuid), {"shutdown_timeout": 0.3, "force_off": True})
    job.refresh_from_db()
    assert [e["state"] for e in job.journal if e["step"] == "force_off"] == ["started", "done"]
    assert job.phase == "moving"


def test_it_leaves_the_shutdown_phase_once_the_guest_is_off(vm, operator):
    job = _cold(vm, phase="", shutdown_deadline=None)

    class Obedient(_StubbornGuest):
        def find_domain(self, uuid):
            return ("shutoff", "shutdown")

    cold.shutdown(JobRun(job, "w1"), Journal.load(job.pk), Obedient(), str(vm.uuid), {"shutdown_timeout": 30})
    job.refresh_from_db()
    assert job.phase == "moving" and job.shutdown_deadline is None and not job.is_shutting_down
    # A click that comes now is refused (and audited as such), not recorded as a success.
    with pytest.raises(services.JobError):
        services.do_force_off_now(job, operator)


def test_it_stores_the_deadline_and_fails_without_force_when_nobody_asks(vm, monkeypatch):
    job = _cold(vm, phase="", shutdown_deadline=None)
    run, journal, src = JobRun(job, "w1"), Journal.load(job.pk), _StubbornGuest()
    before = timezone.now()
    with pytest.raises(Failed, match="did not shut down within 0.5 s"):
        cold.shutdown(run, journal, src, str(vm.uuid), {"shutdown_timeout": 0.5, "force_off": False})
    job.refresh_from_db()
    assert before + timedelta(seconds=0.4) <= job.shutdown_deadline <= timezone.now() + timedelta(seconds=1)
    assert not src.destroyed


def test_it_offers_try_again_prefilled_with_force_off_after_a_failed_shutdown(vm, operator, login):
    job = _cold(
        vm,
        status=MigrationJob.FAILED,
        error="The guest did not shut down within 120 s and forcing it off was not allowed.",
        journal=[
            {"step": "begin", "state": "done", "was_running": True},
            {"step": "shutdown", "state": "started"},
        ],
        options={"shutdown_timeout": 45, "force_off": False, "start_on_target": True},
    )
    client = login(operator)
    page = client.get(reverse("migrations:detail", args=[job.pk]))
    html = page.content.decode()
    assert 'data-testid="job-retry-link"' in html and f"retry={job.pk}" in page.context["retry_query"]
    assert 'data-testid="job-steps"' in html
    wizard = client.get(reverse("migrations:new") + "?" + page.context["retry_query"])
    assert wizard.status_code == 200 and wizard.context["step"] == "options"
    form = wizard.context["form"]
    assert form.initial["mode"] == "cold" and form.initial["force_off"] is True
    assert form.initial["shutdown_timeout"] == 45


def test_it_does_not_offer_try_again_to_a_user_who_cannot_request(vm, auditor, login):
    job = _cold(vm, status=MigrationJob.CANCELLED)
    page = login(auditor).get(reverse("migrations:detail", args=[job.pk]))
    assert page.context["retry_query"] == "" and b"job-retry-link" not in page.content


XML = """<domain type='kvm'><name>g</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e1941</uuid>
<memory>131072</memory><os><type arch='x86_64'>hvm</type></os>{features}
<devices>{channel}</devices></domain>"""
AGENT = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"


class _Ctx:
    def __init__(self, xml, shuts_down=True, active=True, options=None):
        self.strategy = type("S", (), {"shuts_down": shuts_down})()
        self.options = options or {"shutdown_timeout": 120}
        self._dom = {"xml": xml, "active": active}

    def domain(self):
        return self._dom


@pytest.mark.parametrize(
    "features,channel,status",
    [("", "", "warn"), ("<features><acpi/></features>", "", "pass"), ("", AGENT, "pass")],
)
def test_it_warns_when_the_guest_shows_no_way_to_be_shut_down(db, features, channel, status):
    result = check_guest_shutdown(_Ctx(XML.format(features=features, channel=channel)))
    assert result.status == status
    if status == "warn":
        assert "<acpi/>" in result.message and "Force off" in result.remedy


def test_it_does_not_ask_about_shutdown_for_live_or_shut_off_vms(db):
    xml = XML.format(features="", channel="")
    assert check_guest_shutdown(_Ctx(xml, shuts_down=False)).status == "pass"
    assert check_guest_shutdown(_Ctx(xml, active=False)).status == "pass"


def test_it_shows_a_coded_job_error_in_the_viewers_language(vm, operator, login):
    from migrations_app.jobrun import finish

    job = _cold(vm)
    run = JobRun(job, "w1")
    finish(
        run,
        MigrationJob.FAILED,
        [
            ("err_shutdown_timeout", {"timeout": "120"}),
            ("err_rolled_back", {}),
            ("restarted_source", {"host": "ha"}),
            ("err_where_still", {"state": "running", "host": "ha"}),
        ],
    )
    job.refresh_from_db()
    assert job.status == MigrationJob.FAILED
    # Stored in English (logs, API, audit) with the codes beside it.
    assert (
        job.error.startswith("The guest did not shut down within 120 s")
        and "still running on ha" in job.error
    )
    assert [p["code"] for p in job.error_parts][0] == "err_shutdown_timeout"
    event = AuditEvent.objects.get(action="migration.finish")
    assert event.details["error"] == job.error
    client = login(operator)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(reverse("migrations:detail", args=[job.pk]), HTTP_ACCEPT_LANGUAGE="zh-hans")
    html = page.content.decode()
    assert "客户机未在 120 秒内关机" in html and "仍为运行中" in html
    assert "did not shut down within" not in html.split('data-testid="job-error"')[1].split("</p>")[0]


def test_it_stores_a_cancel_before_start_with_its_code(vm, operator):
    job = _cold(vm, status=MigrationJob.QUEUED, phase="")
    services.do_cancel_job(job, operator)
    job.refresh_from_db()
    assert (
        job.status == MigrationJob.CANCELLED
        and job.error == "Cancelled before it started; the VM was not touched."
    )
    from django.utils import translation

    with translation.override("zh-hans"):
        assert job.error_text == "在开始前已取消；虚拟机未受影响。"

"""Windows of single jobs (not before / not after) and host-group blackouts, enforced by
the worker's claim (migrations_app/windows.py, runner.run_job) with test-driver hosts:
nothing here contacts libvirt (the runner's work after the claim is replaced)."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone, translation
from django_q.models import OrmQ

from fleet.models import Blackout
from hosts.models import VM
from kvmweb.audit.models import AuditEvent
from migrations_app import reconcile, runner, services, windows
from migrations_app.jobrun import Failed
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.preflight import CheckResult, Report


def _report():
    results = [CheckResult("connection", "Connections", "pass", "ok")]
    return Report(results=results, verdict=Report.verdict_of(results), started_at="", duration_ms=1)


@pytest.fixture
def ran(monkeypatch):
    """Replace what the runner does after a successful claim: record the job id and end it
    failed (no libvirt)."""
    ids = []

    def fake_run(run):
        ids.append(run.job.pk)
        raise Failed("test: stopped after the claim")

    monkeypatch.setattr(runner, "_run", fake_run)
    return ids


def _create(world, actor, **kw):
    return services.do_create_job(world["vm"], world["b"], "live", {}, actor=actor, report=_report(), **kw)


def _blackout(group, minutes=30, reason="firmware"):
    now = timezone.now()
    return Blackout.objects.create(
        group=group,
        starts_at=now - timedelta(minutes=1),
        ends_at=now + timedelta(minutes=minutes),
        reason=reason,
    )


def test_it_holds_a_job_until_its_window_opens_then_queues_it(
    world, operator, ran, django_capture_on_commit_callbacks
):
    later = timezone.now() + timedelta(minutes=10)
    with django_capture_on_commit_callbacks(execute=True):
        job = _create(world, operator, not_before=later)
    assert job.status == MigrationJob.QUEUED and job.not_before == later
    assert job.waiting_for.startswith("Scheduled: starts at")
    assert not OrmQ.objects.exists()  # held: no message for a worker yet
    audit = AuditEvent.objects.get(action="migration.request")
    assert audit.details["not_before"] == later.isoformat()
    # A message delivered anyway (a duplicate, a requeue) claims nothing before the time.
    assert runner.run_job(job.pk) is None and ran == []
    job.refresh_from_db()
    assert job.status == MigrationJob.QUEUED and job.started_at is None
    # Nothing is due yet: a pass releases nothing.
    assert windows.release_due()["released"] == []
    # The time comes: the pass (any process, after any restart: the row is the state)
    # queues it once, however many passes run.
    with django_capture_on_commit_callbacks(execute=True):
        assert windows.release_due(later + timedelta(seconds=1))["released"] == [job.pk]
        assert windows.release_due(later + timedelta(seconds=2))["released"] == []
    assert OrmQ.objects.count() == 1
    job.refresh_from_db()
    assert job.waiting_for == ""
    MigrationJob.objects.filter(pk=job.pk).update(not_before=timezone.now() - timedelta(seconds=1))
    assert runner.run_job(job.pk) == MigrationJob.FAILED and ran == [job.pk]


def test_it_ends_a_job_not_started_by_its_window_as_missed(world, operator, ran):
    job = _create(world, operator, not_after=timezone.now() + timedelta(minutes=5))
    MigrationJob.objects.filter(pk=job.pk).update(not_after=timezone.now() - timedelta(seconds=1))
    # The worker picks it up too late: the claim refuses and the job ends "missed window".
    assert runner.run_job(job.pk) is None and ran == []
    job.refresh_from_db()
    assert job.status == MigrationJob.CANCELLED and job.missed_window
    assert "Missed its window" in job.error and job.finished_at is not None
    assert [p["code"] for p in job.error_parts] == ["missed_window"]
    with translation.override("zh-hans"):
        assert job.error_text.startswith("错过时间窗口：在 ") and "Missed" not in job.error_text
    event = AuditEvent.objects.get(action="migration.missed_window")
    assert event.outcome == AuditEvent.FAILURE and event.target_id == str(job.pk)
    assert JobEvent.objects.filter(job=job, code="missed_window").exists()


def test_it_ends_held_and_unapproved_jobs_whose_window_closed_at_the_next_pass(world, operator, make_job):
    held = _create(world, operator, not_before=timezone.now() + timedelta(minutes=1))
    closes = held.not_before + timedelta(minutes=1)
    MigrationJob.objects.filter(pk=held.pk).update(not_after=closes)
    out = reconcile.reconcile_jobs(now=closes + timedelta(seconds=1))  # what the schedule runs
    held.refresh_from_db()
    assert held.status == MigrationJob.CANCELLED and held.missed_window
    assert out == {}  # nothing to reconcile; the pass ended the job on its way
    assert AuditEvent.objects.filter(action="migration.missed_window").count() == 1


def test_it_refuses_a_window_that_closes_before_it_opens_or_is_over(world, operator):
    now = timezone.now()
    with pytest.raises(services.JobError, match="closes before it opens"):
        _create(world, operator, not_before=now + timedelta(hours=2), not_after=now + timedelta(hours=1))
    with pytest.raises(services.JobError, match="already closed"):
        _create(world, operator, not_after=now - timedelta(minutes=1))
    with pytest.raises(services.JobError, match="not a date"):
        _create(world, operator, not_before="tomorrow-ish")
    assert not MigrationJob.objects.exists()


def test_it_refuses_a_job_inside_a_blackout_unless_an_administrator_overrides_it(world, operator, admin):
    _blackout(world["g2"])  # the target's group
    with pytest.raises(services.JobError) as err:
        _create(world, operator)
    assert "Blackout of g2 until" in str(err.value) and "firmware" in str(err.value)
    refused = AuditEvent.objects.get(action="migration.request")
    assert refused.outcome == AuditEvent.DENIED and "Blackout of g2" in refused.details["error"]
    # Only an administrator may override, and that is audited with the request.
    with pytest.raises(services.JobError, match="Only an administrator"):
        _create(world, operator, ignore_blackouts=True)
    assert not MigrationJob.objects.exists()
    job = _create(world, admin, ignore_blackouts=True)
    assert job.ignore_blackouts and job.status == MigrationJob.QUEUED
    created = AuditEvent.objects.get(action="migration.request", outcome=AuditEvent.SUCCESS)
    assert created.details["ignore_blackouts"] is True and created.actor_name == admin.username


def test_it_holds_a_queued_job_at_the_claim_while_a_blackout_lasts(world, operator, admin, ran):
    job = _create(world, operator)
    blackout = _blackout(world["g1"], reason="")  # the source's group, set after the request
    assert runner.run_job(job.pk) is None and ran == []
    job.refresh_from_db()
    assert job.status == MigrationJob.QUEUED and job.waiting_for.startswith("Blackout of g1 until")
    assert JobEvent.objects.filter(job=job, code="waiting").count() == 1
    runner.run_job(job.pk)  # held again with the same reason: no second log line
    assert JobEvent.objects.filter(job=job, code="waiting").count() == 1
    # Held jobs are not "lost": requeue_lost leaves them to release_due.
    assert reconcile.requeue_lost(now=timezone.now() + timedelta(minutes=5)) == []
    # The blackout ends: the next pass queues it and the claim lets it in.
    Blackout.objects.filter(pk=blackout.pk).update(ends_at=timezone.now() - timedelta(seconds=1))
    assert windows.release_due()["released"] == [job.pk]
    assert runner.run_job(job.pk) == MigrationJob.FAILED and ran == [job.pk]
    # A job an administrator started inside a blackout passes the claim.
    _blackout(world["g1"])
    other = _create(world, admin, ignore_blackouts=True)
    assert runner.run_job(other.pk) == MigrationJob.FAILED and ran == [job.pk, other.pk]


def test_it_requeues_a_released_job_whose_message_was_lost(world, operator):
    later = timezone.now() + timedelta(minutes=1)
    job = _create(world, operator, not_before=later)
    windows.release_due(later + timedelta(seconds=1))  # on_commit not run: the message is lost
    assert not OrmQ.objects.exists()
    # Five minutes pass without a worker taking it (its log lines age with it).
    then = timezone.now() - timedelta(minutes=5)
    MigrationJob.objects.filter(pk=job.pk).update(created_at=then)
    JobEvent.objects.filter(job=job).update(at=then)
    assert reconcile.requeue_lost() == [job.pk]


def test_it_takes_the_window_from_the_command_line(world, admin, monkeypatch, passing_preflight):
    monkeypatch.setattr("migrations_app.management.commands.migrate_vm.refresh_vm_state", lambda vm: None)
    later = timezone.now() + timedelta(hours=1)
    call_command(
        "migrate_vm",
        "web1",
        "hb",
        "--mode",
        "live",
        "--user",
        admin.username,
        "--not-before",
        later.isoformat(),
    )
    job = MigrationJob.objects.get()
    assert job.not_before == later and job.waiting_for
    with pytest.raises(CommandError) as err:
        call_command(
            "migrate_vm", "web1", "hb", "--mode", "live", "--user", admin.username, "--not-after", "soon"
        )
    assert err.value.returncode == 2


def test_it_takes_the_window_from_the_wizard_and_counts_down_on_the_job_page(
    world, operator, login, monkeypatch
):
    monkeypatch.setattr("migrations_app.preflight.run_preflight", lambda plan, **kw: _report())
    client = login(operator)
    later = timezone.localtime() + timedelta(hours=2)
    response = client.post(
        "/migrations/new/",
        {
            "vm": world["vm"].pk,
            "target": world["b"].pk,
            "mode": "live",
            "options": "{}",
            "not_before": later.strftime("%Y-%m-%dT%H:%M"),
        },
    )
    job = MigrationJob.objects.get()
    assert response.status_code == 302 and job.not_before is not None and job.waiting_for
    page = client.get(f"/migrations/{job.pk}/").content.decode()
    assert 'data-testid="job-countdown"' in page and "data-countdown=" in page
    # The confirm step offers the fields (the override only to administrators).
    confirm = client.get(
        f"/migrations/new/?vm={world['vm'].pk}&target={world['b'].pk}&mode=live&step=preflight"
    ).content.decode()
    assert 'name="not_before"' in confirm and 'name="ignore_blackouts"' not in confirm


def test_it_takes_the_window_from_the_api(world, operator, client, passing_preflight):
    client.force_login(operator)
    later = timezone.now() + timedelta(hours=1)
    body = {"vm": world["vm"].pk, "target": world["b"].pk, "mode": "live", "not_before": later.isoformat()}
    response = client.post("/api/v1/jobs/", body, content_type="application/json")
    assert response.status_code == 202, response.content
    job = MigrationJob.objects.get()
    assert job.not_before == later and response.json()["waiting_for"] == job.waiting_for != ""
    body["not_after"] = (later - timedelta(hours=2)).isoformat()
    refused = client.post("/api/v1/jobs/", body, content_type="application/json")
    assert refused.status_code == 400 and "closes before it opens" in str(refused.json())


def test_it_reads_the_claims_clock_after_waiting_for_the_other_jobs_writes(world, operator, ran, monkeypatch):
    from contextlib import contextmanager

    closing = timezone.now() + timedelta(minutes=5)
    job = _create(world, operator, not_after=closing)
    other = services.do_create_job(
        VM.objects.create(
            uuid="6695eb01-f6a4-8304-79aa-97f2502e1940", name="web2", host=world["a"], state="running"
        ),
        world["b"],
        "live",
        {},
        actor=operator,
        report=_report(),
    )
    real_now, late = timezone.now, {"by": timedelta(0)}
    monkeypatch.setattr(timezone, "now", lambda: real_now() + late["by"])

    @contextmanager
    def busy_writers(wait=True):
        late["by"] = timedelta(minutes=10)  # the other jobs' writes held the lock that long
        yield True

    monkeypatch.setattr(runner, "writing", busy_writers)
    # The window closed while the claim waited: the claim refuses, the job ends missed.
    assert runner.run_job(job.pk) is None and ran == []
    job.refresh_from_db()
    assert job.status == MigrationJob.CANCELLED and job.missed_window
    # A job without a window is claimed with the time of the claim (its heartbeat too).
    late["by"] = timedelta(0)
    assert runner.run_job(other.pk) == MigrationJob.FAILED and ran == [other.pk]
    other.refresh_from_db()
    assert other.started_at >= real_now() + timedelta(minutes=9)

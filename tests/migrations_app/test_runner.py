"""Runner and reconcile edge cases the lab cannot produce on demand, with a scripted
stand-in for libvirt's answers (where_is); the real paths run in test_jobs_lab.py.
Plus the progress maths, on jobStats dicts shaped like the lab's."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.db.models import Q
from django.utils import timezone, translation

from hosts.models import VM, Host
from kvmweb.audit.models import AuditEvent
from migrations_app import jobrun, reconcile, runner
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.modes import live

MiB = 1 << 20


def test_it_reports_setup_then_disk_copy_then_memory_phases():
    assert live.progress_from_stats({"type": "unbounded", "data_total": 0})["phase"] == "setup"
    disk = live.progress_from_stats(
        {
            "data_total": 64 * MiB,
            "data_remaining": 48 * MiB,
            "disk_total": 64 * MiB,
            "disk_remaining": 48 * MiB,
        }
    )
    assert disk["phase"] == "disk copy" and disk["percent"] == 25.0
    memory = live.progress_from_stats(
        {
            "data_total": 128 * MiB,
            "data_processed": 100 * MiB,
            "data_remaining": 32 * MiB,
            "memory_processed": 100 * MiB,
            "memory_bps": 16 * MiB,
            "memory_iteration": 1,
            "memory_dirty_rate": 256,  # pages/s
            "memory_page_size": 4096,
        }
    )
    assert memory["phase"] == "memory" and memory["percent"] == 75.0
    assert memory["eta_seconds"] == 2.0 and memory["dirty_rate"] == MiB


def test_it_gives_no_eta_when_the_guest_dirties_faster_than_the_link():
    p = live.progress_from_stats(
        {
            "data_total": 128 * MiB,
            "data_remaining": 40 * MiB,
            "memory_processed": 200 * MiB,
            "memory_bps": 4 * MiB,
            "memory_iteration": 5,
            "memory_dirty_rate": 2048,
            "memory_page_size": 4096,
        }
    )
    assert p["eta_seconds"] is None


def test_it_never_shows_100_percent_before_the_end_and_names_the_switchover():
    p = live.progress_from_stats({"data_total": 10, "data_remaining": 0}, ("paused", "migration"))
    assert p["percent"] == 99.9 and p["phase"] == "completing"
    assert live.progress_from_stats({"data_total": 10}, ("paused", "postcopy"))["phase"] == "post-copy"


@pytest.fixture
def job(db):
    a = Host.objects.create(name="ha", uri="test:///default")
    b = Host.objects.create(name="hb", uri="test:///other")
    vm = VM.objects.create(uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web1", host=a, state="running")
    return MigrationJob.objects.create(
        vm=vm,
        vm_name="web1",
        source=a,
        source_name="ha",
        target=b,
        target_name="hb",
        mode="live",
        status=MigrationJob.RUNNING,
        heartbeat_at=timezone.now() - timedelta(seconds=30),
        worker="gone:1",
    )


def _where(monkeypatch, **answer):
    monkeypatch.setattr(live, "where_is", lambda job: dict(answer))


def test_it_marks_a_silent_job_for_reconcile_and_leaves_a_beating_one_alone(job):
    fresh = MigrationJob.objects.create(
        vm=VM.objects.create(uuid="11111111-2222-3333-4444-555555555555", name="db", host=job.source),
        vm_name="db",
        source_name="ha",
        target_name="hb",
        mode="live",
        status=MigrationJob.RUNNING,
        heartbeat_at=timezone.now(),
    )
    assert reconcile.mark_stale() == [job.pk]
    job.refresh_from_db()
    fresh.refresh_from_db()
    assert job.status == MigrationJob.NEEDS_RECONCILE and fresh.status == MigrationJob.RUNNING
    assert JobEvent.objects.filter(job=job, message__contains="heartbeat stopped").exists()


def test_it_reconciles_only_the_named_job_when_asked(job, monkeypatch):
    # `reconcile_jobs --job ID --stale 0`: another running job, between two heartbeats,
    # must not be taken from its live worker.
    other = MigrationJob.objects.create(
        vm=VM.objects.create(uuid="11111111-2222-3333-4444-555555555555", name="db", host=job.source),
        vm_name="db",
        source_name="ha",
        target_name="hb",
        mode="live",
        status=MigrationJob.RUNNING,
        heartbeat_at=timezone.now(),
    )
    _where(monkeypatch, source=("running", "migration_canceled"), source_job="none", target=None)
    assert reconcile.reconcile_jobs(stale_seconds=0, job_ids=[job.pk]) == {job.pk: MigrationJob.FAILED}
    other.refresh_from_db()
    assert other.status == MigrationJob.RUNNING
    assert not JobEvent.objects.filter(job=other).exists()


def test_it_concludes_failed_when_libvirt_kept_the_vm_on_the_source(job, monkeypatch):
    _where(monkeypatch, source=("running", "migration_canceled"), source_job="none", target=None)
    assert reconcile.reconcile_jobs() == {job.pk: MigrationJob.FAILED}
    job.refresh_from_db()
    assert (
        job.status == MigrationJob.FAILED
        and "running on ha" in job.error
        and "Nothing was retried" in job.error
    )
    assert AuditEvent.objects.get(action="migration.finish").outcome == AuditEvent.FAILURE


def test_it_concludes_cancelled_when_a_cancel_was_asked(job, monkeypatch):
    MigrationJob.objects.filter(pk=job.pk).update(cancel_requested=True, status=MigrationJob.CANCELLING)
    _where(monkeypatch, source=("running", "migration_canceled"), source_job="none", target=None)
    reconcile.reconcile_jobs()
    job.refresh_from_db()
    assert job.status == MigrationJob.CANCELLED


def test_it_waits_when_a_host_cannot_be_reached(job, monkeypatch):
    _where(monkeypatch, source="unreachable", target=("running", "migrated"))
    assert reconcile.reconcile_jobs() == {job.pk: "retry"}
    job.refresh_from_db()
    assert job.status == MigrationJob.NEEDS_RECONCILE and not job.finished_at
    line = JobEvent.objects.get(job=job, message__startswith="Cannot reach ha")
    with translation.override("zh-hans"):
        assert line.code == "retry_where" and line.text == "无法连接 ha 以确定虚拟机所在位置；稍后重试。"


def test_it_refuses_to_guess_when_the_vm_is_on_both_hosts(job, monkeypatch):
    _where(monkeypatch, source=("running", "unpaused"), target=("running", "migrated"))
    reconcile.reconcile_jobs()
    job.refresh_from_db()
    assert job.status == MigrationJob.FAILED and "check which copy is the real one" in job.error


def test_it_reports_a_vm_found_nowhere(job, monkeypatch):
    _where(monkeypatch, source=None, target=None)
    reconcile.reconcile_jobs()
    job.refresh_from_db()
    assert job.status == MigrationJob.FAILED and "neither" in job.error


def test_it_reconciles_each_job_once_even_when_two_reconcilers_race(job, monkeypatch):
    _where(monkeypatch, source=("running", "migration_canceled"), target=None)
    reconcile.mark_stale()
    assert reconcile.reconcile_one(job.pk) == MigrationJob.FAILED
    assert reconcile.reconcile_one(job.pk) is None  # the claim is gone: nothing happens
    assert AuditEvent.objects.filter(action="migration.finish").count() == 1


def test_it_explains_a_failure_where_the_source_stopped_answering(job, monkeypatch):
    _where(monkeypatch, source="unreachable", target=None)
    run = jobrun.JobRun(job, "w")
    with pytest.raises(jobrun.Failed, match="source host ha stopped answering"):
        live.explain_failure(run, Exception("End of file while reading data"))


def test_it_calls_a_cancel_that_libvirt_reports_as_another_error_a_cancel(job, monkeypatch):
    # Lab, at load ~20: a cancel that landed while libvirt was still setting the migration
    # up came back as "Invalid argument", not "operation aborted", and the job ended failed.
    _where(monkeypatch, source=("running", "unpaused"), target=None)
    run = jobrun.JobRun(job, "w")
    run.applied["cancel"] = True
    with pytest.raises(jobrun.Cancelled, match="still running on ha"):
        live.explain_failure(run, Exception("operation failed: migration failed: Invalid argument"))
    line = JobEvent.objects.get(job=job, code="cancel_ended_with")
    assert "Invalid argument" in line.message
    # Without a cancel asked for, the same error stays a failure.
    del run.applied["cancel"]
    with pytest.raises(jobrun.Failed, match="Invalid argument"):
        live.explain_failure(run, Exception("operation failed: migration failed: Invalid argument"))


def test_it_does_nothing_for_a_job_it_cannot_claim(job):
    MigrationJob.objects.filter(pk=job.pk).update(status=MigrationJob.SUCCEEDED)
    assert runner.run_job(job.pk) is None
    assert not JobEvent.objects.filter(job=job).exists()


def test_it_queues_a_long_waiting_job_again_once(job, django_capture_on_commit_callbacks):
    from django_q.models import OrmQ

    MigrationJob.objects.filter(pk=job.pk).update(
        status=MigrationJob.QUEUED, created_at=timezone.now() - timedelta(minutes=5)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert reconcile.requeue_lost() == [job.pk]
        assert reconcile.requeue_lost() == []  # not again within five minutes
    assert OrmQ.objects.filter(key="migrations").count() == 1
    assert JobEvent.objects.filter(job=job, message__startswith="Queued again").count() == 1


def test_it_queues_a_lost_job_again_from_an_idle_migrations_worker(job, django_capture_on_commit_callbacks):
    from django_q.models import OrmQ

    from migrations_app import tasks

    def queued(seconds_ago):
        at = timezone.now() - timedelta(seconds=seconds_ago)
        MigrationJob.objects.filter(pk=job.pk).update(status=MigrationJob.QUEUED, created_at=at)
        JobEvent.objects.filter(job=job).update(at=at)

    queued(reconcile.LOST_AFTER_SECONDS - 5)  # its worker may still be on its way
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.requeue_lost_if_idle() == []
        queued(reconcile.LOST_AFTER_SECONDS + 5)
        tasks._running = 1  # busy: a queued job may be waiting for a free worker
        try:
            assert tasks.requeue_lost_if_idle() is None
        finally:
            tasks._running = 0
        assert tasks.requeue_lost_if_idle() == [job.pk]
        assert tasks.requeue_lost_if_idle() == []  # its own line restarts the wait
    assert OrmQ.objects.filter(key="migrations").count() == 1
    line = JobEvent.objects.get(job=job, message__startswith="Queued again")
    assert f"for {reconcile.LOST_AFTER_SECONDS} s" in line.message
    # Still not taken a while later: sent again, but not more than once a minute.
    JobEvent.objects.filter(job=job).update(
        at=timezone.now() - timedelta(seconds=reconcile.LOST_AFTER_SECONDS + 5)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.requeue_lost_if_idle() == []
    JobEvent.objects.filter(job=job).update(
        at=timezone.now() - timedelta(seconds=reconcile.LOST_REPEAT_SECONDS + 5)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.requeue_lost_if_idle() == [job.pk]
    assert OrmQ.objects.filter(key="migrations").count() == 2


def test_it_records_the_guest_memory_from_the_completed_statistics(job):
    # No progress poll saw the RAM phase (a short migration on a busy worker): the job
    # still ends with its guest's memory, from libvirt's completed-job statistics.
    assert job.memory_total == 0
    run = jobrun.JobRun(job, "w:1")
    stats = {"memory_total": 96 * MiB, "data_processed": 30 * MiB, "time_elapsed": 1200, "downtime": 40}
    jobrun.conclude_success(run, stats)
    job.refresh_from_db()
    assert job.status == MigrationJob.SUCCEEDED
    assert (job.memory_total, job.data_processed, job.elapsed_ms) == (96 * MiB, 30 * MiB, 1200)


def test_it_runs_on_the_checklist_its_caller_just_made_and_queues_the_hosts_sync(job, monkeypatch):
    """migrate_vm --wait: the command's own checklist stands in for the re-check, and the
    hosts' full sync is queued instead of run before the job ends."""
    from django_q.models import OrmQ

    from migrations_app import modes
    from migrations_app.preflight.report import Report

    MigrationJob.objects.filter(pk=job.pk).update(status=MigrationJob.QUEUED, heartbeat_at=None, worker="")

    def no_checklist(*a, **kw):
        raise AssertionError("the checklist ran again")

    def no_sync(host):
        raise AssertionError("synced before the job ended")

    def migrated(mode, run, plan):
        assert MigrationJob.objects.get(pk=job.pk).status == MigrationJob.RUNNING
        jobrun.conclude_success(run, {"time_elapsed": 900, "downtime": 30, "data_processed": MiB})

    monkeypatch.setattr(runner, "run_preflight", no_checklist)
    monkeypatch.setattr(jobrun, "do_sync_inventory", no_sync)
    monkeypatch.setattr(type(modes.get("live")), "run", migrated)
    report = Report(results=[], verdict="pass", started_at="", duration_ms=0)
    before = OrmQ.objects.count()
    assert runner.run_job(job.pk, "migrate_vm:h:1", checked=report, defer_sync=True) == MigrationJob.SUCCEEDED
    job.refresh_from_db()
    assert job.status == MigrationJob.SUCCEEDED and job.worker == "migrate_vm:h:1"
    assert job.preflight["verdict"] == "pass"
    assert OrmQ.objects.count() == before + 1  # the sync, for the default cluster
    assert AuditEvent.objects.filter(action="migration.finish", outcome=AuditEvent.SUCCESS).count() == 1


@pytest.mark.parametrize(
    "age, checked_again",
    [
        (0.5, False),  # the confirm's re-check, half a second before the claim: it stands in
        (40.0, True),  # the job waited for a worker longer than the limit: run again
        (-30.0, True),  # "from the future": another clock, trusted for a second at most
        (None, True),  # no request-time checklist (a batch child, migrate_vm without --wait)
    ],
)
def test_it_takes_the_checklist_of_the_request_only_when_claimed_within_seconds(
    job, monkeypatch, age, checked_again
):
    import time

    monkeypatch.setattr(runner, "REQUEST_CHECK_SECONDS", 30)  # a slow machine's claim is in time

    from migrations_app import modes
    from migrations_app.preflight.report import CheckResult, Report

    stored = Report(
        results=[CheckResult("vm_state", "VM state", "pass", "running")],
        verdict="pass",
        started_at="",
        duration_ms=0,
    ).to_dict()
    if age is not None:
        stored["at_request"] = time.time() - age
    MigrationJob.objects.filter(pk=job.pk).update(
        status=MigrationJob.QUEUED, heartbeat_at=None, worker="", preflight=stored
    )
    ran = []

    def checklist(plan, **kwargs):
        ran.append(kwargs)
        return Report.from_dict(stored)

    def migrated(mode, run, plan):
        jobrun.conclude_success(run, {"time_elapsed": 900, "downtime": 30, "data_processed": MiB})

    monkeypatch.setattr(runner, "run_preflight", checklist)
    monkeypatch.setattr(jobrun, "sync_after", lambda job: None)
    monkeypatch.setattr(type(modes.get("live")), "run", migrated)
    assert runner.run_job(job.pk, "w:1") == MigrationJob.SUCCEEDED
    assert bool(ran) is checked_again
    lines = list(JobEvent.objects.filter(job=job).values_list("message", flat=True))
    if checked_again:
        assert ran[0]["measure_dirty_rate"] is False
        assert "Preflight passed again on the worker." in lines
    else:
        assert any(line.startswith("Preflight passed with the request, ") for line in lines), lines


def test_it_opens_the_source_connections_before_the_claim_only_for_a_live_job_it_may_take(make_job):
    """The live mode's two source connections open in a thread while the claim runs; not
    for a job the claim will not take (held) nor for a mode that needs none."""
    live_job = make_job(status=MigrationJob.QUEUED)
    opening = runner._open_ahead(live_job.pk)
    assert opening is not None and opening.wait(10) and opening.error is None
    mig, mon = opening.value
    assert mig.uri == mon.uri == "test:///default" and mig.call_timeout == settings.MIGRATION_TIMEOUT
    runner._close_opening(opening)
    MigrationJob.objects.filter(pk=live_job.pk).update(waiting_for="Waiting for a free slot")
    assert runner._open_ahead(live_job.pk) is None
    MigrationJob.objects.filter(pk=live_job.pk).update(waiting_for="", status=MigrationJob.RUNNING)
    assert runner._open_ahead(live_job.pk) is None
    offline = make_job(status=MigrationJob.QUEUED, mode="offline")
    assert runner._open_ahead(offline.pk) is None


def test_it_hands_the_connections_opened_before_the_claim_to_the_run_or_closes_them(make_job, monkeypatch):
    opened, closed = [], []
    real = runner._open_ahead

    def recording(job_id):
        opening = real(job_id)
        opened.append(opening)
        return opening

    monkeypatch.setattr(runner, "_open_ahead", recording)
    monkeypatch.setattr(runner, "_close_opening", lambda opening: closed.append(opening))
    monkeypatch.setattr(runner, "_close_later", lambda opening: closed.append(opening))  # no thread here
    taken = []
    monkeypatch.setattr(runner, "_run", lambda run: taken.append(run.connections))
    job = make_job(status=MigrationJob.QUEUED)
    runner.run_job(job.pk, "w:1")
    assert taken == [opened[0]] and opened[0] is not None
    assert closed == [opened[0]]  # unused by the stand-in run: closed at its end
    # A claim that fails (taken meanwhile) closes what it opened.
    other = make_job(status=MigrationJob.QUEUED)
    monkeypatch.setattr(runner, "claim_condition", lambda now, job_id=None: Q(pk__in=[]))
    assert runner.run_job(other.pk, "w:2") is None
    assert closed[-1] is opened[-1] and opened[-1] is not None
    # So does a claim that raises (the database gone, a lock wait timed out).
    third = make_job(status=MigrationJob.QUEUED)

    def broken(now, job_id=None):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(runner, "claim_condition", broken)
    with pytest.raises(RuntimeError):
        runner.run_job(third.pk, "w:3")
    assert closed[-1] is opened[-1] and len(opened) == 3
    for opening in opened:
        opening.wait(10)
        for conn in opening.value:
            conn.close()


def test_it_queues_the_hosts_sync_as_a_job_fails_that_another_left_it_to(make_job, monkeypatch):
    """A job that succeeded beside a running one left their hosts' full listing to it
    (jobrun.sync_after); when that one then fails or is cancelled, its end queues the
    listing. Before, only the periodic sync caught up."""
    import django_q.tasks

    sent = []
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, job_id, **kw: sent.append((func, job_id)))

    def past_its_checklist(job):
        run = jobrun.JobRun(job, "w:1")
        run.mark("preflight_done")
        return run

    failing = make_job(status=MigrationJob.RUNNING)
    assert jobrun.finish(past_its_checklist(failing), MigrationJob.FAILED, "libvirt said no") == "failed"
    assert sent == [("migrations_app.tasks.sync_hosts_after_job", failing.pk)]
    cancelled = make_job(vm_name="web2", status=MigrationJob.RUNNING)
    jobrun.finish(past_its_checklist(cancelled), MigrationJob.CANCELLED, "cancelled by bob")
    assert sent[-1] == ("migrations_app.tasks.sync_hosts_after_job", cancelled.pk)
    # A success lists its hosts in its own conclusion (sync_after, or queue_sync for
    # migrate_vm --wait), not here; a job already ended by another finisher queues none;
    # nor does one refused by its checklist (it touched no host).
    done = make_job(vm_name="web3", status=MigrationJob.RUNNING)
    jobrun.finish(past_its_checklist(done), MigrationJob.SUCCEEDED, "")
    jobrun.finish(past_its_checklist(done), MigrationJob.FAILED, "too late")
    refused = make_job(vm_name="web4", status=MigrationJob.PREFLIGHT)
    jobrun.finish(jobrun.JobRun(refused, "w:1"), MigrationJob.FAILED, "the checklist blocks it")
    assert MigrationJob.objects.get(pk=refused.pk).status == MigrationJob.FAILED
    assert len(sent) == 2

"""What keeps many jobs at once cheap (benchmarks/concurrent_migrations.py): heartbeats
at most every HEARTBEAT_SECONDS, progress sampling that slows with the number of running
jobs, the writers' lock on SQLite and the progress samples that give way to it, the
worker's re-check that reuses the static checks of a fresh checklist, and the full
inventory sync left to the last job still under way on a host."""

import fcntl
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from django.db import connection

from hosts.models import Host
from migrations_app import jobrun, reconcile, runner
from migrations_app.models import MigrationJob, ProgressSample
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import CheckResult, Report, run_preflight


@pytest.fixture
def lock_file(tmp_path, monkeypatch):
    """The writers' lock as if the database were a file in tmp_path (the test database
    is in memory: nobody else writes to it, and the lock is not used for it)."""
    path = tmp_path / "kvmweb.sqlite3-writers.lock"
    monkeypatch.setattr(jobrun, "writers_lock_path", lambda: str(path))
    return path


@pytest.fixture
def other_writer(lock_file):
    """Another job's process holding the writers' lock; .release() lets it go."""

    class Writer:
        def __init__(self):
            self.fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def release(self):
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    writer = Writer()
    yield writer
    writer.release()


def _beat_of(job):
    return MigrationJob.objects.values_list("heartbeat_at", flat=True).get(pk=job.pk)


def test_it_writes_a_heartbeat_at_most_every_heartbeat_seconds(make_job):
    job = make_job(heartbeat_at=datetime(2026, 1, 1, tzinfo=UTC))
    run = jobrun.JobRun(job, "w:1")
    run.heartbeat()  # the claim wrote one a moment ago: nothing to write
    assert _beat_of(job) == datetime(2026, 1, 1, tzinfo=UTC)
    run.beat_at -= jobrun.HEARTBEAT_SECONDS
    run.heartbeat()
    written = _beat_of(job)
    assert written > datetime(2026, 1, 1, tzinfo=UTC)
    run.heartbeat()  # just written
    assert _beat_of(job) == written
    run.heartbeat(force=True)
    assert _beat_of(job) >= written
    assert jobrun.HEARTBEAT_SECONDS * 3 < reconcile.STALE_SECONDS  # a missed beat or two is harmless


def test_it_samples_less_often_the_more_jobs_run(make_job):
    job = make_job()
    run = jobrun.JobRun(job, "w:1")
    for i in range(7):
        make_job(vm_name=f"web{i + 2}", status=MigrationJob.RUNNING)
    assert run.poll_seconds() == jobrun.POLL_SECONDS  # until the first sample is written
    run.sampled = 1
    run.counted_at = None
    MigrationJob.objects.exclude(pk=job.pk).update(status=MigrationJob.SUCCEEDED)
    assert run.poll_seconds() == jobrun.POLL_SECONDS  # one job: 4 samples a second
    MigrationJob.objects.filter(status=MigrationJob.SUCCEEDED).update(status=MigrationJob.RUNNING)
    assert run.poll_seconds() == jobrun.POLL_SECONDS  # counted again only after COUNT_SECONDS
    run.counted_at -= jobrun.COUNT_SECONDS
    assert run.poll_seconds() == 8 / jobrun.SAMPLES_PER_SECOND == 1.0
    for i in range(8):
        make_job(vm_name=f"more{i}", status=MigrationJob.RUNNING)
    run.counted_at -= jobrun.COUNT_SECONDS
    assert run.poll_seconds() == jobrun.MAX_POLL_SECONDS


def test_it_samples_a_cold_disk_copy_as_a_live_migration_is_sampled(make_job, monkeypatch):
    """The copy loop waits JobRun.poll_seconds between samples (less often with many jobs
    at once) and its samples give way to other writers. The copy itself is a stand-in
    here (the test driver has no volume streams); the lab tests copy real disks."""
    from migrations_app.journal import Journal
    from migrations_app.modes import cold

    job = make_job(mode="cold")
    job.vm.disks = [{"device": "disk", "source": "/pool/web1.qcow2"}]
    job.vm.save()
    run = jobrun.JobRun(job, "w:1")
    copied, waits, written = threading.Event(), [], []

    def copy_volume(src, dst, path, progress, should_stop):
        for done in (1, 2, 3):
            progress(done * 1024, 4096)
            time.sleep(0.02)
        copied.wait(5)

    def poll_seconds():
        waits.append(True)
        if len(waits) >= 3:
            copied.set()
        return 0.01

    def progress(fields, optional=False, **kwargs):
        written.append((fields["phase"], optional))

    monkeypatch.setattr(cold.hv, "create_copy_volume", lambda src, dst, path: None)
    monkeypatch.setattr(cold.hv, "copy_volume", copy_volume)
    monkeypatch.setattr(run, "poll_seconds", poll_seconds)
    monkeypatch.setattr(run, "progress", progress)
    src = SimpleNamespace(volume_at=lambda path: {"physical": 4096})
    dst = SimpleNamespace(call=lambda what, fn: fn(None))
    cold.copy_disks(run, Journal(job.pk), src, dst)
    assert len(waits) >= 3
    assert written[:-1] and all(optional for _phase, optional in written[:-1])  # the samples
    assert written[-1] == ("disk copy", False)  # the copy's end is always written


@pytest.mark.django_db(transaction=True)  # outside a transaction, as in a worker
def test_it_skips_an_optional_progress_sample_while_another_job_writes(make_job, other_writer):
    job = make_job()
    run = jobrun.JobRun(job, "w:1")
    run.sampled = 1  # the job's first sample is always written (test below)
    fields = {"phase": "memory", "percent": 10.0, "iteration": 1}
    assert run.progress(fields, optional=True) is False
    assert not ProgressSample.objects.filter(job=job).exists()
    assert MigrationJob.objects.get(pk=job.pk).phase != "memory"
    assert run.last_phase is None  # the phase line is written with the next sample
    other_writer.release()
    assert run.progress(fields, optional=True) is True
    assert ProgressSample.objects.filter(job=job).count() == 1
    assert job.events.filter(code="phase").count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("why", ["heartbeat due", "first sample"])
def test_it_waits_for_the_lock_when_the_heartbeat_is_due_or_for_the_first_sample(make_job, other_writer, why):
    job = make_job()
    run = jobrun.JobRun(job, "w:1")
    if why == "heartbeat due":
        run.sampled = 1
        run.beat_at -= jobrun.HEARTBEAT_SECONDS
    waiting = threading.Event()
    done = {}

    def sample():
        waiting.set()
        done["written"] = run.progress({"phase": "memory", "percent": 20.0}, optional=True)
        connection.close()

    thread = threading.Thread(target=sample)
    thread.start()
    waiting.wait(60)
    thread.join(0.5)  # it must not get through while the other writer holds the lock
    assert thread.is_alive() and "written" not in done
    other_writer.release()
    thread.join(60)
    assert done == {"written": True}
    assert ProgressSample.objects.filter(job=job).count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_does_not_take_the_writers_lock_inside_a_transaction(other_writer):
    from django.db import transaction

    with jobrun.writing(wait=False) as free:
        assert free is False  # outside a transaction: another job is writing
    with transaction.atomic():
        # A thread already in a transaction may hold SQLite's own lock: waiting here for
        # a writer that waits for SQLite's lock would deadlock.
        with jobrun.writing() as free:
            assert free is True


def test_it_reuses_only_the_static_checks_of_a_fresh_checklist():
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    results = [
        CheckResult("cpu", "CPU", "pass", "same model").to_dict(),
        CheckResult("memory", "Free memory", "pass", "plenty").to_dict(),
        CheckResult("storage", "Storage", "warn", "probe slow").to_dict(),
    ]
    fresh = {"started_at": (now - timedelta(seconds=30)).isoformat(), "results": results}
    reused = runner.reusable_results(fresh, now)
    assert set(reused) == {"cpu", "storage"}  # memory is checked again
    assert reused["storage"].status == "warn" and reused["storage"].message == "probe slow"
    # The shared-storage proof is re-proved once the checklist is over a minute old.
    minutes = dict(fresh, started_at=(now - timedelta(seconds=runner.STORAGE_REUSE_SECONDS + 1)).isoformat())
    assert set(runner.reusable_results(minutes, now)) == {"cpu"}
    old = dict(fresh, started_at=(now - timedelta(seconds=runner.RECHECK_REUSE_SECONDS + 1)).isoformat())
    assert runner.reusable_results(old, now) == {}
    assert runner.reusable_results(dict(fresh, reused=["cpu"]), now) == {}  # a re-check's own
    # A re-check that says where its static results came from: as old as that checklist.
    recheck = dict(fresh, started_at=now.isoformat(), reused=["cpu"])
    assert set(runner.reusable_results(dict(recheck, reused_from=fresh["started_at"]), now)) == {
        "cpu",
        "storage",
    }
    assert runner.reusable_results(dict(recheck, reused_from=old["started_at"]), now) == {}
    assert runner.reusable_results({}, now) == {}
    assert runner.reusable_results(None, now) == {}
    assert runner.reusable_results(dict(fresh, started_at="2026-05-01T11:59:30"), now) == {}  # no zone


def test_it_takes_reused_results_as_they_are_and_runs_the_others(world):
    plan = MigrationPlan(world["vm"], world["a"], world["b"], "live", {})
    given = CheckResult("cpu", "CPU compatibility", "pass", "taken from the wizard's checklist")
    report = run_preflight(plan, measure_dirty_rate=False, reuse={"cpu": given})
    assert report.result("cpu").message == "taken from the wizard's checklist"
    assert report.reused == ["cpu"]
    assert report.result("memory") is not None and report.result("connection").status != "skip"
    assert Report.from_dict(report.to_dict()).reused == ["cpu"]


def test_it_leaves_a_hosts_full_sync_to_a_job_still_under_way_there(make_job, monkeypatch):
    synced = []
    monkeypatch.setattr(jobrun, "do_sync_inventory", lambda host: synced.append(host.name) or {})
    done = make_job(status=MigrationJob.SUCCEEDED)
    other = make_job(vm_name="web2", status=MigrationJob.RUNNING)
    jobrun.sync_after(done)
    assert synced == []  # both hosts are the running job's: its end lists them
    third = Host.objects.create(name="hc", uri="test:///third")
    MigrationJob.objects.filter(pk=other.pk).update(source=third)
    jobrun.sync_after(done)
    assert synced == ["ha"]  # the target (hb) is still the other job's
    MigrationJob.objects.filter(pk=other.pk).update(status=MigrationJob.SUCCEEDED)
    jobrun.sync_after(MigrationJob.objects.get(pk=other.pk))
    assert synced == ["ha", "hb", "hc"]


def test_it_writes_without_a_lock_file_it_cannot_open_and_says_so_once(monkeypatch, tmp_path, caplog):
    path = tmp_path / "missing-dir" / "db-writers.lock"  # its directory does not exist
    monkeypatch.setattr(jobrun, "writers_lock_path", lambda: str(path))
    monkeypatch.setattr(jobrun, "_unusable", set())
    for _ in range(3):
        with jobrun.writing() as free:
            assert free is True
    assert [r.message for r in caplog.records].count(
        f"writers' lock {path} unusable ([Errno 2] No such file or directory: '{path}'); writing without it"
    ) == 1

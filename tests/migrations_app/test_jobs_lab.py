"""Migration jobs on the real KVM lab, through the worker's code path.

Every mode runs through do_create_job + runner.run_job (the very function the django-q2
task calls) against real libvirtd hosts and real QEMU guests. The faults that need a
real worker process (killed worker, duplicated task) or a second process acting while
the worker runs (cancel, target libvirtd killed) run against a real
`Q_CLUSTER_NAME=migrations manage.py qcluster` subprocess with its own file SQLite DB.
"""

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lab as labkit
from hosts import services as host_services
from hosts.models import VM, VMLocation
from kvmweb.audit.models import AuditEvent
from migrations_app import runner, services
from migrations_app.models import JobEvent, MigrationJob, ProgressSample
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight
from migrations_app.services import do_create_job

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


def _sync(*hosts):
    for host in hosts:
        # The lab is shared: another test's network or guest may vanish mid-read; retry.
        for _attempt in range(3):
            error = host_services.do_sync_inventory(host)["error"]
            if not error:
                break
            time.sleep(0.2)
        assert not error


def _create(user, guest, target, mode, **options):
    """The wizard's path: preflight, acknowledge its warnings, create (queued)."""
    vm = VM.objects.get(uuid=guest.uuid)
    plan = MigrationPlan(vm, vm.host, target, mode, options)
    report = run_preflight(plan, measure_dirty_rate=False)
    assert not report.fails, [(r.id, r.message) for r in report.fails]
    return do_create_job(
        vm, target, mode, options, actor=user, report=report, acknowledged=[r.id for r in report.warnings]
    )


def _run(job):
    status = runner.run_job(job.pk)
    job.refresh_from_db()
    assert status == job.status
    return job


def _counter_at_least(host, name, value, timeout=60):
    deadline = time.monotonic() + timeout
    while labkit.read_counter(host, name) < value:
        assert time.monotonic() < deadline, f"counter of {name} on {host} stayed below {value}"
        time.sleep(0.05)


def _assert_moved(job, guest, target="lab-b"):
    vm = VM.objects.select_related("host").get(uuid=guest.uuid)
    assert vm.host.name == target and not vm.gone
    loc = VMLocation.objects.filter(vm=vm).first()
    assert loc.host_name == target and loc.via == "migration"
    finish = AuditEvent.objects.filter(action="migration.finish", target_id=str(job.pk)).get()
    assert finish.outcome == AuditEvent.SUCCESS and finish.details["status"] == "succeeded"
    return vm


def test_it_runs_a_live_migration_job_and_records_progress_and_final_figures(hosts, lab_guest, admin):
    guest = lab_guest("mj-live")
    _sync(hosts["lab-a"])
    before = labkit.read_counter("lab-a", guest)
    job = _create(admin, guest, hosts["lab-b"], "live", bandwidth=32)
    assert job.status == MigrationJob.QUEUED
    job = _run(job)
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "running"}
    _counter_at_least("lab-b", guest, before)  # RAM moved: it continues, no fresh boot
    labkit.wait_counter_moves("lab-b", guest)  # and runs there (not left paused)
    assert job.percent == 100 and job.phase == "done"
    assert job.downtime_ms is not None and job.elapsed_ms > 0 and job.result["data_processed"] > 0
    samples = list(ProgressSample.objects.filter(job=job))
    assert len(samples) >= 3 and max(s.rate for s in samples) > 0
    assert any(s.remaining > 0 for s in samples)
    events = [e.message for e in JobEvent.objects.filter(job=job)]
    assert any("Phase: memory" in m for m in events) and events[-1].startswith("Succeeded")
    assert job.progress_seq > len(samples)
    _assert_moved(job, guest)


def test_it_runs_a_live_storage_copy_job_and_removes_the_source_disk_when_asked(hosts, lab_guest, admin):
    guest = lab_guest("mj-copy", storage="local")
    src_disk = labkit.local_dir("lab-a") / f"{guest}.qcow2"
    dst_disk = labkit.local_dir("lab-b") / f"{guest}.qcow2"
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "live-copy", remove_source_disks=True))
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "running"}
    labkit.wait_counter_moves("lab-b", guest)
    assert dst_disk.exists() and not src_disk.exists()
    assert job.result["removed_source_disks"] == [f"{labkit.LOCAL_IN_HOST}/{guest}.qcow2"]
    _assert_moved(job, guest)


def test_it_keeps_the_source_disk_after_a_storage_copy_unless_asked(hosts, lab_guest, admin):
    guest = lab_guest("mj-keep", storage="local")
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "live-copy"))
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert (labkit.local_dir("lab-a") / f"{guest}.qcow2").exists()
    assert "removed_source_disks" not in job.result


def test_it_runs_a_cold_job_on_shared_storage_forcing_off_after_the_timeout(hosts, lab_guest, admin):
    guest = lab_guest("mj-cold")  # the dirtier ignores ACPI: the graceful shutdown times out
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "cold", shutdown_timeout=1, force_off=True))
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "running"}  # started on the target as it ran before
    labkit.wait_counter_moves("lab-b", guest)
    events = [e.message for e in JobEvent.objects.filter(job=job)]
    assert any("forcing it off" in m for m in events)
    assert job.result["storage"] == "shared" and job.result["was_running"] is True
    _assert_moved(job, guest)


def test_it_fails_a_cold_job_when_the_guest_does_not_shut_down_and_force_is_off(hosts, lab_guest, admin):
    guest = lab_guest("mj-noforce")
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "cold", shutdown_timeout=1))
    assert job.status == MigrationJob.FAILED
    assert "did not shut down within 1 s" in job.error and "still running on lab-a" in job.error
    assert labkit.where(guest) == {"lab-a": "running"}


def test_it_runs_a_cold_job_with_local_disks_by_copying_volumes(hosts, lab_guest, admin):
    guest = lab_guest("mj-coldcopy", storage="local", running=False)
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "cold"))
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "shut off"}  # it was off: not started
    assert (labkit.local_dir("lab-b") / f"{guest}.qcow2").exists()
    assert (labkit.local_dir("lab-a") / f"{guest}.qcow2").exists()  # kept: not asked to remove
    assert job.result["storage"] == "copied" and job.disk_total > 0
    labkit.start_guest(guest, "lab-b")  # the copied disk boots
    labkit.wait_counter_moves("lab-b", guest)
    _assert_moved(job, guest)


def test_it_runs_an_offline_job_that_moves_only_the_definition(hosts, lab_guest, admin):
    guest = lab_guest("mj-offline", running=False)
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "offline"))
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "shut off"}
    _assert_moved(job, guest)


def test_it_plans_a_cold_move_from_the_vms_state_now_not_the_last_sync(hosts, lab_guest, admin):
    guest = lab_guest("mj-livestate", running=False)
    _sync(hosts["lab-a"])  # kvmweb last saw it shut off ...
    labkit.start_guest(guest, "lab-a")  # ... then someone started it outside kvmweb
    vm = VM.objects.get(uuid=guest.uuid)
    assert vm.state == "shutoff"
    options = {"force_off": True, "shutdown_timeout": 1}
    every = [r.id for r in run_preflight(MigrationPlan(vm, vm.host, hosts["lab-b"], "cold", options)).results]
    job = do_create_job(vm, hosts["lab-b"], "cold", options, actor=admin, acknowledged=every)
    assert job.options["start_on_target"] is True
    job = _run(job)
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "running"}


def test_it_says_not_converging_when_the_guest_dirties_faster_than_the_cap(
    hosts, lab_guest, admin, monkeypatch
):
    # 8 MiB rewritten every 10 ms against a 4 MiB/s cap: pass 2 can never fit in the
    # allowed downtime. The job must say so (no ETA) instead of "converging".
    # The verdict needs pass 2, and pass 1 of this guest takes 5-9 s here but most of 12 s
    # on a slow machine: so no completion timeout decides when the test ends. An operator
    # reading the job cancels it the moment the "not converging" line is written (the
    # worker's own thread does the reading, between two polls: the in-memory test database
    # sees no second writer); the completion timeout is only a backstop.
    from migrations_app.modes import live

    judge = live.judge_convergence

    def judge_then_cancel_once_said(run, fields):
        judge(run, fields)
        said = JobEvent.objects.filter(job_id=run.job_id, code__startswith="not_converging").exists()
        if said and not run.applied.get("cancel"):
            services.do_cancel_job(MigrationJob.objects.get(pk=run.job_id), admin)

    monkeypatch.setattr(live, "judge_convergence", judge_then_cancel_once_said)
    guest = lab_guest("mj-stall", memory_mib=64, fill_mib=16, hot_mib=8, delay_ms=10)
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "live", bandwidth=4, completion_timeout=180))
    events = list(JobEvent.objects.filter(job=job).values_list("message", flat=True))
    assert job.status == MigrationJob.CANCELLED, (job.error, events)
    assert not JobEvent.objects.filter(job=job, code="timeout_abort").exists(), events
    lines = JobEvent.objects.filter(job=job, code__startswith="not_converging")
    assert lines.exists(), events
    assert "Raise the bandwidth" in lines.first().message
    assert ProgressSample.objects.filter(job=job, iteration__gte=2).exists()
    said = (lines.first().at - job.started_at).total_seconds()
    took = (job.finished_at - job.started_at).total_seconds()
    print(f"not converging: said {said:.1f} s after the migration started; cancelled, ended at {took:.1f} s")
    # The sample of the verdict shows the phase "not converging" (and no ETA).
    assert JobEvent.objects.filter(job=job, code="phase", params__phase="not converging").exists(), events
    assert labkit.where(guest) == {"lab-a": "running"}


def test_it_raises_the_downtime_in_steps_then_aborts_a_migration_that_never_converges(
    hosts, lab_guest, admin
):
    # The stalled guest above with the ladder-abort policy: 300 ms -> 380, 480, 600 ms, a
    # step every 2 s (or 3 passes) while not converging; at 4 MiB/s only 2.4 MiB fit in
    # 600 ms while 8 MiB stay hot, so the ladder must end in an abort, the VM on lab-a.
    guest = lab_guest("mj-ladder", memory_mib=64, fill_mib=16, hot_mib=8, delay_ms=10)
    _sync(hosts["lab-a"])
    options = {"convergence_policy": "ladder-abort", "ladder_max_downtime": 600, "ladder_step_seconds": 2}
    # The completion timeout is only a backstop: the ladder must act well before it.
    job = _run(_create(admin, guest, hosts["lab-b"], "live", bandwidth=4, completion_timeout=180, **options))
    assert job.status == MigrationJob.FAILED, job.error
    assert "convergence policy aborted" in job.error and "600 ms" in job.error, job.error
    assert "still running on lab-a" in job.error
    steps = JobEvent.objects.filter(job=job, code="policy_downtime").order_by("id")
    assert [(e.params["ms"], e.params["step"]) for e in steps] == [(380, 1), (480, 2), (600, 3)]
    assert JobEvent.objects.filter(job=job, code="policy_abort").count() == 1
    assert not JobEvent.objects.filter(job=job, code="timeout_abort").exists()
    marks = list(ProgressSample.objects.filter(job=job).exclude(mark="").values_list("mark", flat=True))
    assert marks == ["380 ms", "480 ms", "600 ms", "abort"]
    assert job.requested_downtime == 600  # the row shows the downtime the ladder reached
    finish = AuditEvent.objects.filter(action="migration.finish", target_id=str(job.pk)).get()
    assert finish.outcome == AuditEvent.FAILURE
    # libvirt agrees with the job: the VM runs on lab-a only and keeps running.
    assert labkit.where(guest) == {"lab-a": "running"}
    labkit.wait_counter_moves("lab-a", guest)


def test_it_aborts_at_the_completion_timeout_and_leaves_the_vm_on_the_source(hosts, lab_guest, admin):
    guest = lab_guest("mj-timeout")
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "live", bandwidth=8, completion_timeout=1))
    assert job.status == MigrationJob.FAILED
    assert "did not complete within the completion timeout" in job.error and "lab-a" in job.error
    assert labkit.where(guest) == {"lab-a": "running"}
    labkit.wait_counter_moves("lab-a", guest)


def test_it_never_runs_a_job_twice(hosts, lab_guest, admin):
    guest = lab_guest("mj-twice", running=False)
    _sync(hosts["lab-a"])
    job = _run(_create(admin, guest, hosts["lab-b"], "offline"))
    assert job.status == MigrationJob.SUCCEEDED
    events = JobEvent.objects.filter(job=job).count()
    assert runner.run_job(job.pk) is None  # a redelivered message: nothing happens
    assert JobEvent.objects.filter(job=job).count() == events
    assert labkit.where(guest) == {"lab-b": "shut off"}


def test_it_fails_when_preflight_on_the_worker_now_fails_and_touches_nothing(hosts, lab_guest, admin):
    guest = lab_guest("mj-stale", running=False)
    _sync(hosts["lab-a"])
    job = _create(admin, guest, hosts["lab-b"], "offline")
    labkit.start_guest(guest, "lab-a")  # the world changed between the wizard and the worker
    job = _run(job)
    assert job.status == MigrationJob.FAILED
    assert "now blocks this migration" in job.error
    assert job.preflight["verdict"] == "fail"
    assert labkit.where(guest) == {"lab-a": "running"}


# ------------------------------------------------------------------ real worker process


def _sync_cli(cluster, *hosts):
    for h in hosts:
        cluster.manage("sync_inventory", h)


def _running(job):
    return job["status"] == "running" and job["percent"] > 0


# Readiness waits of the tests below: backstops only (each returns as soon as the job gets
# there). A loaded machine starts the worker, its first job and every manage.py slowly.
STARTED = 120
ENDED = 120


# The guests of the tests below go through migrate_vm, whose preflight measures the dirty
# rate; libvirt's page-sampling reads in steps of 2 MiB/s, so a guest dirtying 0.25 MiB/s
# still read 2 or 4 MiB/s now and then and a 1 or 4 MiB/s cap was refused as
# non-converging (lab/guests.py QUIET). lab.QUIET reads 0 (rarely 2): a 4 MiB/s cap is
# always accepted. LONG fills 120 MiB: ~30 s at 4 MiB/s, so the migration still runs when
# a control sent through a new manage.py (~2 s here, over 10 s on a loaded machine)
# arrives; the control ends it, so the length costs nothing.
QUIET = labkit.QUIET
LONG = dict(labkit.QUIET, fill_mib=120)


def _ended(job):
    return job["status"] in ("cancelled", "failed", "succeeded")


# Run in a manage.py shell of the cluster: one line of Python per command, then "done"
# (or its traceback and "failed").
PRIMED = """
import sys, traceback
from django.core.management import call_command
print("ready", flush=True)
for line in sys.stdin:
    try:
        exec(line)
        print("done", flush=True)
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("failed", flush=True)
"""


class Primed:
    """A manage.py process of the cluster, Django already loaded, that runs what it is
    sent at once. A control sent through a new manage.py took 10-20 s to start on a
    loaded machine: a migration the test meant to act on mid-way had ended by then (the
    killed-worker test sent two, and its 8 s migration was over before the worker died)."""

    def __init__(self, cluster):
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "-c", PRIMED],
            cwd=ROOT,
            env=cluster.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._until(("ready",), STARTED)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # exited

    def _until(self, markers, timeout):
        said, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"the primed manage.py did not answer in {timeout} s: {''.join(said)}"
                ) from None
            if line is None:
                raise AssertionError(f"the primed manage.py exited ({self.proc.wait(30)}): {''.join(said)}")
            if line.strip() in markers:
                assert line.strip() != "failed", "".join(said)
                return "".join(said)
            said.append(line)

    def python(self, code):
        """Run one line of Python there; returns what it printed."""
        self.proc.stdin.write(code + "\n")
        self.proc.stdin.flush()
        return self._until(("done", "failed"), ENDED)

    def manage(self, *args):
        """call_command(*args) there (what `manage.py ARGS` runs); returns its output."""
        return self.python(f"call_command(*{[str(a) for a in args]!r})")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stdin.close()


@pytest.fixture
def primed(cluster):
    p = Primed(cluster)
    yield p
    p.close()


BUSY = (
    "import json, os; from kvmweb import qbroker; print(json.dumps({c: qbroker.workers_of('migrations', "
    "int(c))[0] for c in {n.split('.')[1] for n in os.listdir(qbroker.busy_dir()) if n.startswith('migrations.')}}))"
)


def _parent(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # gone


def _busy_workers(cluster, primed):
    """How many workers of this cluster's qcluster run a migration now, as its pusher
    counts them (the busy files of its sentinel, the qcluster process's child)."""
    busy = json.loads(primed.python(BUSY).strip().splitlines()[-1])
    mine = [n for c, n in busy.items() if _parent(int(c)) == cluster.proc.pid]
    assert len(mine) == 1, (busy, cluster.proc.pid)
    return mine[0]


def test_it_cancels_a_running_migration_within_two_seconds(cluster, lab_guest, primed):
    guest = lab_guest("mj-cancel", **LONG)
    _sync_cli(cluster, "lab-a")
    # 4 MiB/s: 120 MiB of filled RAM take ~30 s, so the migration still runs when the
    # cancel arrives; the cancel ends it, so the slow cap costs nothing.
    job_id = cluster.migrate(guest, "lab-b", "--mode", "live", "--bandwidth", "4")
    cluster.wait(job_id, _running, STARTED, "running with progress")
    # Its worker marks the task it runs under its own cluster (the qcluster's sentinel):
    # that cluster's pusher takes another migration only for a free worker
    # (kvmweb/qbroker.py ONE_PER_WORKER).
    assert _busy_workers(cluster, primed) == 1
    primed.manage("migration_job", job_id, "cancel")
    job = cluster.wait(job_id, _ended, ENDED, "final")
    assert job["status"] == "cancelled", job
    assert "still running on lab-a" in job["error"]
    asked = next(at for at, m in cluster.events(job_id) if m.startswith("Cancel requested"))
    took = _seconds(job["finished_at"]) - _seconds(asked)
    print(f"cancel: request to job cancelled {took:.2f} s")
    assert 0 <= took < 2, f"cancel took {took:.2f} s"
    assert labkit.where(guest) == {"lab-a": "running"}
    labkit.wait_counter_moves("lab-a", guest)


def test_it_applies_a_bandwidth_change_while_the_migration_runs(cluster, lab_guest, primed):
    guest = lab_guest("mj-bw", **LONG)
    _sync_cli(cluster, "lab-a")
    # 4 MiB/s: still running when the change arrives (it lifts the cap: no time lost).
    job_id = cluster.migrate(guest, "lab-b", "--mode", "live", "--bandwidth", "4", "--max-downtime", "500")
    cluster.wait(job_id, _running, STARTED, "running with progress")
    primed.manage("migration_job", job_id, "bandwidth", "0")  # unlimited: it finishes at once
    job = cluster.wait(job_id, _ended, ENDED, "final")
    assert job["status"] == "succeeded", job
    messages = [m for _at, m in cluster.events(job_id)]
    assert "Bandwidth now unlimited." in messages and "Maximum downtime now 500 ms." in messages
    assert labkit.where(guest) == {"lab-b": "running"}


def test_it_switches_a_running_migration_to_post_copy_on_request(cluster, lab_guest, primed):
    guest = lab_guest("mj-postcopy", **LONG)
    _sync_cli(cluster, "lab-a")
    # 4 MiB/s: still in pre-copy when the switch arrives; post-copy then runs uncapped
    # (libvirt sets no post-copy bandwidth unless asked).
    job_id = cluster.migrate(guest, "lab-b", "--mode", "live", "--bandwidth", "4", "--postcopy")
    cluster.wait(job_id, _running, STARTED, "running with progress")
    before = labkit.read_counter("lab-a", guest)
    primed.manage("migration_job", job_id, "postcopy")
    job = cluster.wait(job_id, _ended, ENDED, "final")
    assert job["status"] == "succeeded", job
    messages = [m for _at, m in cluster.events(job_id)]
    assert any(m.startswith("Switched to post-copy") for m in messages), messages
    assert labkit.where(guest) == {"lab-b": "running"}
    _counter_at_least("lab-b", guest, before)
    labkit.wait_counter_moves("lab-b", guest)


def test_it_runs_migrate_vm_with_wait_in_its_own_process(cluster, lab_guest):
    """--wait claims and runs the job itself (a worker is running beside it: its copy of
    the message finds the job taken), with one "picked up" line."""
    guest = lab_guest("mj-cli", running=False)
    _sync_cli(cluster, "lab-a")
    # The worker gets the message only after the command claimed the job: on a loaded
    # machine an idle worker otherwise claimed it first (the command then follows it).
    with cluster.workers_paused():
        r = cluster.manage("migrate_vm", guest, "lab-b", "--mode", "offline", "--wait", "--json", "--ack-all")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    assert job["status"] == "succeeded" and job["target"] == "lab-b", r.stdout
    cluster.queue_drained(ENDED)  # the worker's copy of the message was processed: it did nothing
    (worker,) = cluster.q("select worker from migrations_app_migrationjob where id=?", job["id"])[0]
    assert worker.startswith("migrate_vm:"), worker
    messages = [m for _at, m in cluster.events(job["id"])]
    assert len([m for m in messages if m.startswith("Picked up")]) == 1, messages
    assert "Preflight passed (the checklist migrate_vm ran just before the request)." in messages
    assert labkit.where(guest) == {"lab-b": "shut off"}
    again = cluster.manage("migrate_vm", guest, "lab-a", "--mode", "live", "--json", check=False)
    assert again.returncode != 0 and "Live migration needs a running VM" in again.stdout + again.stderr


def test_it_cancels_a_cold_job_while_it_waits_for_the_shutdown(cluster, lab_guest, primed):
    guest = lab_guest("mj-coldcancel")  # ignores ACPI: the shutdown wait runs its course
    _sync_cli(cluster, "lab-a")
    job_id = cluster.migrate(guest, "lab-b", "--mode", "cold", "--shutdown-timeout", "60")
    cluster.wait(job_id, lambda j: j["status"] == "running", STARTED, "running")
    primed.manage("migration_job", job_id, "cancel")
    job = cluster.wait(job_id, _ended, ENDED, "final")
    assert job["status"] == "cancelled" and "during the shutdown" in job["error"], job
    assert labkit.where(guest) == {"lab-a": "running"}


def test_it_forces_off_now_a_guest_that_ignores_acpi_and_finishes_the_move(cluster, lab_guest, primed):
    guest = lab_guest("mj-forceoff")  # ignores ACPI: without "Force off now" it would wait 120 s
    _sync_cli(cluster, "lab-a")
    job_id = cluster.migrate(guest, "lab-b", "--mode", "cold", "--shutdown-timeout", "120")
    cluster.wait(job_id, lambda j: j["status"] == "running", STARTED, "running")
    deadline = time.monotonic() + 60
    while cluster.q("select phase from migrations_app_migrationjob where id=?", job_id)[0][0] != "shutdown":
        assert time.monotonic() < deadline, "the shutdown wait did not begin"
        time.sleep(0.1)
    stored = cluster.q("select shutdown_deadline from migrations_app_migrationjob where id=?", job_id)[0][0]
    assert stored  # every watcher counts down to this instant
    asked = time.monotonic()
    primed.python(
        "from django.contrib.auth.models import User; from migrations_app import services; "
        "from migrations_app.models import MigrationJob; "
        f"services.do_force_off_now(MigrationJob.objects.get(pk={job_id}), User.objects.get(username='admin'))"
    )
    job = cluster.wait(job_id, _ended, ENDED, "final")
    took = time.monotonic() - asked
    assert job["status"] == "succeeded", job
    assert labkit.where(guest) == {"lab-b": "running"}
    journal = json.loads(
        cluster.q("select journal from migrations_app_migrationjob where id=?", job_id)[0][0]
    )
    forced = [e for e in journal if e["step"] == "force_off"]
    assert [e["state"] for e in forced] == ["started", "done"] and forced[0]["asked_by"] == "admin"
    audit = cluster.q("select outcome from audit_auditevent where action='migration.force_off'")
    assert audit == [("success",)], audit
    print(f"force off now: the cold move finished {took:.1f} s after the request (shutdown timeout 120 s)")


def _seconds(text):
    from datetime import datetime

    return datetime.fromisoformat(text.replace(" ", "T")).timestamp()


def test_it_reconciles_after_the_worker_is_killed_and_never_migrates_twice(cluster, lab_guest, primed):
    guest = lab_guest("mj-kill", **QUIET)
    _sync_cli(cluster, "lab-a")
    # 4 MiB/s (~9 s for 32 MiB of filled RAM): the migration must still run in libvirt
    # when reconcile comes, which the primed process makes a matter of milliseconds after
    # the kill, not of a Python start-up.
    job_id = cluster.migrate(guest, "lab-b", "--mode", "live", "--bandwidth", "4")
    # A duplicate delivery of the same message (what the ORM broker does after `retry`).
    primed.python(
        "from django_q.tasks import async_task; "
        f"async_task('migrations_app.tasks.run_migration', {job_id}, cluster='migrations')"
    )
    try:
        cluster.wait(job_id, _running, STARTED, "running with progress")
        cluster.kill()
        killed_at = time.monotonic()
        said = primed.manage("reconcile_jobs", "--job", job_id, "--stale", "0")
        deadline = killed_at + ENDED
        while not _ended(cluster.job(job_id)):  # backstop: more passes, as the scheduled task does
            assert time.monotonic() < deadline, f"not reconciled: {cluster.job(job_id)} {said}"
            cluster.manage("reconcile_jobs", "--job", str(job_id), "--stale", "0")
        took = time.monotonic() - killed_at
    finally:
        cluster.start()
    job = cluster.job(job_id)
    where = labkit.where(guest)
    assert list(where.values()).count("running") == 1, where
    # PEER2PEER: the source libvirtd finished the migration after the worker died.
    assert job["status"] == "succeeded" and where == {"lab-b": "running"}, (job, where)
    messages = [m for _at, m in cluster.events(job_id)]
    assert sum(m.startswith("Picked up by worker") for m in messages) == 1, messages
    assert sum(m.startswith("Migration started") for m in messages) == 1, messages
    assert any("heartbeat stopped" in m for m in messages)
    assert any("re-attached" in m for m in messages), "\n".join(messages) + said
    print(f"killed worker: reconciled {took:.1f} s after SIGKILL")


def test_it_fails_clearly_when_the_target_libvirtd_dies_mid_migration(cluster, lab_guest):
    started = labkit.up(3)  # lab-c: killing its daemon disturbs nobody else's tests
    try:
        cluster.manage("add_host", "lab-c", labkit.uri("lab-c"), "--no-sync", check=False)
        guest = lab_guest("mj-tgtkill", **QUIET)
        _sync_cli(cluster, "lab-a")
        # 4 MiB/s (~9 s): still running when the daemon is killed; the kill ends it.
        job_id = cluster.migrate(guest, "lab-c", "--mode", "live", "--bandwidth", "4")
        cluster.wait(job_id, _running, STARTED, "running with progress")
        from lab import core

        pid = core._host_pids("lab-c")["libvirtd"]
        assert pid
        os.kill(pid, signal.SIGKILL)
        job = cluster.wait(job_id, _ended, ENDED, "final")
        assert job["status"] == "failed", job
        assert "target host's libvirtd went away" in job["error"] and "still running on lab-a" in job["error"]
        assert labkit.where(guest).get("lab-a") == "running"
        labkit.wait_counter_moves("lab-a", guest)
    finally:
        if started:
            labkit.down(hosts=["lab-c"])
        else:
            labkit.up(3)  # someone else's lab-c: bring its daemon back


@pytest.fixture
def cli_server(cluster, tmp_path):
    """`manage.py cli_server` for the cluster's database (its own data dir for the socket,
    the session's keys), stopped by its PID."""
    import socket
    import subprocess
    import sys

    from django.conf import settings

    from migrations_app.cliclient import ROOT, socket_path

    env = dict(cluster.env, KVMWEB_DATA_DIR=str(tmp_path))
    for name, key in (("secret_key", "KVMWEB_SECRET_KEY"), ("audit_key", "KVMWEB_AUDIT_KEY")):
        if not env.get(key) and not env.get(f"{key}_FILE"):
            env[f"{key}_FILE"] = str(settings.DATA_DIR / name)
    log_path = tmp_path / "cli_server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "cli_server"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(socket_path(env)))
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    yield env, log_path
    proc.terminate()
    proc.wait(30)
    log.close()


def test_it_serves_migrate_vm_wait_and_cancels_the_job_on_ctrl_c(cluster, cli_server, lab_guest):
    """Served by cli_server, --wait runs the job in the served process; Ctrl-C on the
    caller reaches it and cancels the migration (the VM stays on the source)."""
    import subprocess
    import sys

    from migrations_app.cliclient import ROOT

    env, log = cli_server
    guest = lab_guest("mj-served", **QUIET)
    _sync_cli(cluster, "lab-a")
    before = cluster.q("select coalesce(max(id), 0) from migrations_app_migrationjob")[0][0]
    # 4 MiB/s (~9 s): still running when Ctrl-C comes; the cancel ends it.
    cmd = [sys.executable, "manage.py", "migrate_vm", guest, "lab-b", "--mode", "live", "--bandwidth", "4"]
    with contextlib.ExitStack() as paused:
        # The served process claims the job before the worker sees the message (as in
        # test_it_runs_migrate_vm_with_wait_in_its_own_process); continued once it runs.
        paused.enter_context(cluster.workers_paused())
        proc = subprocess.Popen(
            [*cmd, "--ack-all", "--wait"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not cluster.q("select id from migrations_app_migrationjob where id > ?", before):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            job_id = cluster.q("select id from migrations_app_migrationjob where id > ?", before)[0][0]
            cluster.wait(job_id, _running, STARTED, "running with progress")
            paused.close()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "cancelling job" in err
    assert "migrate_vm in process" in log.read_text()
    job = cluster.job(job_id)
    assert job["status"] == "cancelled", job
    (worker,) = cluster.q("select worker from migrations_app_migrationjob where id=?", job_id)[0]
    assert worker.startswith("migrate_vm:"), worker
    assert labkit.where(guest) == {"lab-a": "running"}
    labkit.wait_counter_moves("lab-a", guest)


# A queued job whose message is gone (a worker killed between taking it and its claim:
# the ORM broker would hand it out again only after `retry`, hours), its last log line
# 20 s old; no default cluster runs here.
LOST_MESSAGE = """
from datetime import timedelta
from django.utils import timezone
from hosts.models import VM, Host
from migrations_app.models import MigrationJob
a, b = Host.objects.get(name="lab-a"), Host.objects.get(name="lab-b")
vm = VM.objects.create(uuid="6695eb01-f6a4-8304-79aa-0000000105ef", name="mj-lost", host=a, state="running")
job = MigrationJob.objects.create(vm=vm, vm_name=vm.name, source=a, source_name=a.name, target=b,
    target_name=b.name, mode="live", status="queued")
MigrationJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(seconds=20))
print(job.pk)
"""


def test_it_queues_a_job_whose_message_was_lost_again_from_the_migrations_cluster(cluster):
    job_id = int(cluster.manage("shell", "-c", LOST_MESSAGE).stdout.split()[-1])
    # Taken by a worker (its checklist then fails: the VM exists only in the database).
    cluster.wait(job_id, lambda j: j["status"] != "queued", STARTED, "taken by a worker")
    messages = [m for _at, m in cluster.events(job_id)]
    again = [m for m in messages if m.startswith("Queued again")]
    # Once, by an idle migrations worker (the 15 s of tasks.watch_lost, not reconcile's
    # 60 s), though every idle worker of the cluster looks.
    assert len(again) == 1 and "for 15 s" in again[0], messages
    assert any(m.startswith("Picked up") for m in messages), messages

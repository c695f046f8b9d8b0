"""`manage.py migrate_vm VM TARGET --mode MODE [options] [--wait] [--json]`.

The same service and job path as the wizard: preflight, do_create_job (policy, audit,
one-active-job constraint), the job queued on the "migrations" cluster and run by a
worker (`Q_CLUSTER_NAME=migrations manage.py qcluster`, started by scripts/run.sh).

--wait runs the job in this process, as `virsh migrate` waits on its own migration:
runner.run_job's conditional claim (the worker's), journal and heartbeats, so a job is
never started twice and a killed command leaves a job that reconcile concludes like a
killed worker's. Its queue message is held until the command knows it does not run the
job (services.messages_held); killed before its claim, the lost-message watch queues it. Why here and not
in the worker: the hand-over (queue pickup, the worker's second checklist) and the
hosts' full inventory sync before the row says "succeeded" cost 0.5-1.5 s of every run
on a loaded host (docs/migration-jobs.md). A job that is not due (--not-before), waits
for approval or that a worker took first is followed, not run. Ctrl-C asks the job to
cancel (as virsh aborts its migration) and waits for it; a second Ctrl-C leaves it.
Exit status 0 only when it succeeded.
"""

import atexit
import gc
import json
import os
import sys
import time
from contextlib import nullcontext

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from hosts.models import VM, Host
from hosts.services import refresh_vm_state
from migrations_app import runner
from migrations_app.jobrun import Operation, worker_name
from migrations_app.models import MigrationJob
from migrations_app.options import MODES
from migrations_app.services import JobError, do_cancel_job, do_create_job, enqueue, messages_held
from migrations_app.windows import WindowError, clean_window


def _timing(label):
    """With KVMWEB_CLI_TIMING=<epoch seconds when the process was started> (set by
    benchmarks/migrate_vs_virsh.py), print "timing LABEL SECONDS" to stderr: where the
    command's wall time goes."""
    t0 = os.environ.get("KVMWEB_CLI_TIMING")
    if t0:
        try:
            sys.stderr.write(f"timing {label} {time.time() - float(t0):.3f}\n")
            sys.stderr.flush()
        except ValueError:
            pass


_exit_handlers = []

# The checklist this process ran stands in for the worker's re-check when the job is
# claimed within this many seconds of it (normally milliseconds: the job row is created
# in between). Older, the runner runs the checklist again, as a worker does.
CHECKED_FRESH_SECONDS = 10.0


def _register_exit_handlers():
    """Once per process (tests call the command many times). gc.freeze is registered last,
    so it runs first at exit: every object alive then goes to the permanent generation and
    the interpreter's final collection skips it. Tearing down the Django + libvirt object
    graph that way took 0.3-0.8 s after the job had ended (benchmarks/migrate_vs_virsh.py);
    the process still runs its exit handlers and flushes its streams normally, and the
    operating system frees the memory."""
    if not _exit_handlers:
        _exit_handlers.append(True)
        atexit.register(_timing, "exit")
        atexit.register(gc.freeze)


def job_json(job):
    return {
        "id": job.pk,
        "vm": job.vm_name,
        "source": job.source_name,
        "target": job.target_name,
        "mode": job.mode,
        "status": job.status,
        "phase": job.phase,
        "percent": job.percent,
        "downtime_ms": job.downtime_ms,
        "elapsed_ms": job.elapsed_ms,
        "error": job.error,
        "result": job.result,
        "not_before": job.not_before.isoformat() if job.not_before else None,
        "not_after": job.not_after.isoformat() if job.not_after else None,
        "waiting_for": job.waiting_for,
    }


class Command(BaseCommand):
    help = "Migrate a VM through a kvmweb job (same path as the wizard)."
    # System checks cost ~0.1-2 s of every run (more on a loaded host) and find nothing
    # here that `manage.py check`, the test suite and the web server's start do not.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("vm", help="VM name or UUID")
        parser.add_argument("target", help="target host name")
        parser.add_argument("--mode", required=True, choices=MODES)
        parser.add_argument(
            "--user",
            default=os.environ.get("KVMWEB_ADMIN_USER", "admin"),
            help="act as this kvmweb user (default: KVMWEB_ADMIN_USER or admin)",
        )
        parser.add_argument("--bandwidth", type=int, help="MiB/s")
        parser.add_argument("--max-downtime", type=int, help="ms")
        parser.add_argument("--auto-converge", action="store_true")
        parser.add_argument("--compression", action="store_true")
        parser.add_argument("--parallel", type=int, help="parallel connections")
        parser.add_argument("--postcopy", action="store_true", help="enable post-copy")
        parser.add_argument("--completion-timeout", type=int, help="seconds")
        parser.add_argument("--completion-action", choices=["abort", "postcopy"])
        parser.add_argument(
            "--convergence-policy",
            help="none, ladder, ladder-postcopy or ladder-abort (raise the downtime in steps while not converging)",
        )
        parser.add_argument("--ladder-max-downtime", type=int, help="ms (highest step of the ladder)")
        parser.add_argument("--ladder-steps", type=int, help="number of downtime steps")
        parser.add_argument("--ladder-step-seconds", type=int, help="seconds without converging per step")
        parser.add_argument("--tunnelled", action="store_true")
        parser.add_argument("--migrate-uri")
        parser.add_argument("--no-persist", action="store_true", help="do not persist on the target")
        parser.add_argument("--keep-source", action="store_true", help="do not undefine the source")
        parser.add_argument("--copy-storage", choices=["all", "inc"])
        parser.add_argument("--remove-source-disks", action="store_true")
        parser.add_argument("--shutdown-timeout", type=int, help="cold: seconds to wait for shutdown")
        parser.add_argument("--force-off", action="store_true", help="cold: force off after the timeout")
        start = parser.add_mutually_exclusive_group()
        start.add_argument("--start", dest="start", action="store_true", default=None)
        start.add_argument("--no-start", dest="start", action="store_false")
        parser.add_argument("--ack", action="append", default=[], help="acknowledge a warning (id)")
        parser.add_argument("--ack-all", action="store_true", help="acknowledge every warning")
        parser.add_argument("--override", action="append", default=[], help="override a failed check (id)")
        parser.add_argument("--reason", default="")
        parser.add_argument("--not-before", help="start no earlier than this ISO date-time")
        parser.add_argument(
            "--not-after", help="not started by this ISO date-time: the job ends 'missed window'"
        )
        parser.add_argument(
            "--ignore-blackouts", action="store_true", help="administrators: start inside a blackout window"
        )
        parser.add_argument(
            "--quick",
            action="store_true",
            help="skip the 1 s dirty-rate measurement (the time estimate is then a lower bound)",
        )
        parser.add_argument("--wait", action="store_true", help="follow the job until it ends")
        parser.add_argument("--json", action="store_true", help="print the job as JSON")

    def handle(self, *args, **o):
        _timing("handle")
        _register_exit_handlers()
        from migrations_app import dirtyrate
        from migrations_app.plan import MigrationPlan, PlanError
        from migrations_app.preflight import prime_dirty_rate, run_preflight

        user = get_user_model().objects.filter(username=o["user"]).first()
        if user is None:
            raise CommandError(f"no kvmweb user {o['user']!r} (use --user)", returncode=2)
        vms = VM.objects.restrict(user).filter(gone=False)
        vm = vms.filter(name=o["vm"]).first()
        if vm is None:
            try:
                vm = vms.filter(uuid=o["vm"]).first()
            except Exception:
                vm = None
        if vm is None:
            raise CommandError(f"no VM {o['vm']!r} visible to {user}", returncode=2)
        target = Host.objects.restrict(user).filter(name=o["target"]).first()
        if target is None:
            raise CommandError(f"no host {o['target']!r} visible to {user}", returncode=2)
        _timing("lookup")
        if not o["quick"] and o["mode"] in ("live", "live-copy") and dirtyrate.recall(vm.uuid) is None:
            # libvirt's dirty-rate measurement takes a second: started now, it runs while
            # the state is read and the plan checked; the checklist waits for this one
            # instead of starting its own (migrations_app/preflight/checks/prediction.py).
            prime_dirty_rate(vm)
        options = options_from_args(o)
        try:
            window = clean_window(o["not_before"], o["not_after"])
        except WindowError as exc:
            raise CommandError(str(exc), returncode=2) from None
        if o["mode"] not in ("live", "live-copy") or vm.state not in ("running", "paused", "blocked"):
            # Plan defaults (start on the target) and the plan's state check follow the
            # VM's state now, not the last sync. A live mode with a VM stored as running
            # needs no extra round trip: the checklist reads the state itself and blocks
            # a VM that stopped meanwhile (vm_state).
            refresh_vm_state(vm)
        _timing("state")
        try:
            plan = MigrationPlan(vm, vm.host, target, o["mode"], options)
            plan.validate()
        except PlanError as exc:
            raise CommandError(str(exc), returncode=2) from None
        _timing("plan")
        report = run_preflight(plan, measure_dirty_rate=not o["quick"])
        checked_at = time.monotonic()
        _timing("preflight")
        acks = list(o["ack"])
        if o["ack_all"]:
            acks += warning_ids(report)
        try:
            # With --wait this process runs the job (run_here): its message is held, so no
            # idle worker races the claim below; sent only if the job is not run here.
            with messages_held() if o["wait"] else nullcontext([]) as held:
                job = do_create_job(
                    vm,
                    target,
                    o["mode"],
                    options,
                    actor=user,
                    report=report,
                    acknowledged=acks,
                    overridden=o["override"],
                    reason=o["reason"],
                    not_before=window[0],
                    not_after=window[1],
                    ignore_blackouts=o["ignore_blackouts"],
                )
        except JobError as exc:
            if o["json"]:
                self.stdout.write(json.dumps({"error": str(exc)}))
            raise CommandError(str(exc)) from None
        _timing("job")
        if not o["json"]:
            self.stdout.write(
                f"job #{job.pk}: {job.get_status_display()}  ({plan.virsh_command().splitlines()[0]})"
            )
        if o["wait"]:
            running = run_here(job, report, checked_at)
            if running is None:
                for queued in held:  # approval, a window or a blackout: the workers' job
                    enqueue(queued)
            job = self.follow(job, quiet=o["json"], running=running, user=user)
            _timing("final")
        if o["json"]:
            self.stdout.write(json.dumps(job_json(job)))
        connections.close_all()
        if o["wait"] and job.status != MigrationJob.SUCCEEDED:
            sys.exit(1)

    def follow(self, job, quiet=False, running=None, user=None):
        """Print the job's state as it changes until it ends. ``running``: the Operation
        running it in this process (run_here); Ctrl-C then asks for a cancel once."""
        last = None
        cancelled = running is None
        while True:
            try:
                job.refresh_from_db()
                line = f"#{job.pk} {job.status} {job.phase} {job.percent:.0f}%"
                if not quiet and line != last:
                    self.stdout.write(line)
                    last = line
                if job.is_final:
                    if not quiet:
                        self.stdout.write(job.error or f"succeeded: {job.vm_name} is on {job.target_name}")
                    if running is not None:
                        # What the runner does after the row is final (queueing the
                        # hosts' sync) is short; its thread must not be cut off by exit.
                        running.wait(30)
                    return job
                if running is not None and running.done and running.error is not None:
                    raise running.error
                if running is not None and not running.done:
                    # Wakes as soon as the run ends (its final write comes a moment
                    # before): up to 50 ms sooner than the next poll.
                    running.wait(0.05)
                else:
                    time.sleep(0.05)
            except KeyboardInterrupt:
                if cancelled:
                    raise
                cancelled = True
                self.stderr.write(f"cancelling job #{job.pk} (Ctrl-C again leaves it to reconcile)")
                try:
                    do_cancel_job(job, user)
                except JobError as exc:
                    self.stderr.write(str(exc))


def run_here(job, report, checked_at):
    """Run the job in this process (the worker's claim decides: a job not due, waiting
    for approval or already taken is left alone). Returns the Operation, or None when
    there is nothing to run here."""
    if job.status != MigrationJob.QUEUED or job.waiting_for:
        return None
    checked = report if time.monotonic() - checked_at <= CHECKED_FRESH_SECONDS else None

    def body():
        try:
            return runner.run_job(
                job.pk, worker=f"migrate_vm:{worker_name()}", checked=checked, defer_sync=True
            )
        finally:
            connections.close_all()  # this thread's own connections

    return Operation(body, f"migrate_vm job {job.pk}")


def options_from_args(o):
    options = {}
    for key in (
        "bandwidth",
        "max_downtime",
        "parallel",
        "completion_timeout",
        "shutdown_timeout",
        "ladder_max_downtime",
        "ladder_steps",
        "ladder_step_seconds",
    ):
        if o.get(key) is not None:
            options[key] = o[key]
    for key in ("completion_action", "migrate_uri", "copy_storage", "convergence_policy"):
        if o.get(key):
            options[key] = o[key]
    for key in ("auto_converge", "compression", "postcopy", "tunnelled", "force_off", "remove_source_disks"):
        if o.get(key):
            options[key] = True
    if o.get("no_persist"):
        options["persist"] = False
    if o.get("keep_source"):
        options["undefine_source"] = False
    if o.get("start") is not None:
        options["start_on_target"] = o["start"]
    # Not filtered by mode: the plan checks every given value against the options schema
    # (a bad value is refused even where the option does not apply), then drops the rest.
    return options


def warning_ids(report):
    data = report.to_dict()
    checks = data.get("checks") or data.get("results") or []
    return [c.get("id") for c in checks if c.get("status") == "warn" and c.get("id")]

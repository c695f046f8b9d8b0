"""The migration worker: runs one MigrationJob against real libvirt.

Shape of a run (docs/architecture.md):

1. Claim: a conditional transition queued -> preflight (lifecycle.transition) that also
   requires the job's window to be open and no blackout to hold it (windows.py, in the
   same UPDATE). No row moved means another delivery of the same message (or a cancel)
   got there first, or the job is not due: then it is held with the reason
   (windows.hold) and windows.release_due queues it when its time comes. A redelivered
   or duplicated task is harmless; a migration never starts twice.
2. Preflight again, right before starting (the world may have changed since the wizard):
   the checks of what can change, the static ones taken from a fresh checklist
   (STATIC_CHECKS); a blocking result fails the job with the new report stored. A
   checklist run for the job's own request seconds before stands in (request_check).
3. The mode runs it (migrations_app/modes/): live modes call migrateToURI3 in a helper
   thread while this thread polls jobStats (4x/s, less often with many jobs running:
   JobRun.poll_seconds), writes progress, heartbeats and applies the controls; cold and
   offline walk their journal.
4. Conclude from what libvirt says (migrations_app/jobrun.py): figures, inventory, audit,
   and a message that says in plain words where the VM is.
"""

import logging
import threading
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connections
from django.utils import timezone
from django.utils.translation import gettext as _

from hosts import hypervisor as hv
from migrations_app import modes
from migrations_app.jobrun import (
    POLL_SECONDS,
    Cancelled,
    Failed,
    JobRun,
    Operation,
    Unsettled,
    finish,
    hand_to_reconcile,
    worker_name,
    writing,
)
from migrations_app.lifecycle import transition
from migrations_app.models import MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import Report, run_preflight
from migrations_app.windows import claim_condition, claiming, hold, miss, upcoming, why_not_due

log = logging.getLogger(__name__)

# The worker's re-check runs again what can change between the checklist the job was
# created with and the claim: reachability, the VM's state and jobs, its devices and
# snapshots, the target's free memory, networks and name/UUID collisions, the options.
# The checks below read what stays put for minutes (host versions and identity, CPU and
# machine type support, storage and shared-storage proof, transport and migration ports,
# the duration prediction the user acknowledged); their results are taken from that
# checklist when it is younger than RECHECK_REUSE_SECONDS, the shared-storage proof only
# within STORAGE_REUSE_SECONDS: whether the target sees the very same disk file is what
# keeps a stale copy from being booted, so it is re-proved unless it is that fresh (a job
# started at once, as eight started together are). With eight jobs at once the
# full re-check (a probe volume, CPU comparisons, port probes on both hosts while eight
# migrations start there) took 0.3-2.9 s before each migration
# (benchmarks/concurrent_migrations.py).
STATIC_CHECKS = frozenset(
    {
        "versions",
        "same_host",
        "cpu",
        "machine",
        "vcpus",
        "storage",
        "firmware",
        "transport",
        "migration_ports",
        "prediction",
    }
)
RECHECK_REUSE_SECONDS = 300
STORAGE_REUSE_SECONDS = 60
# A checklist run for the request that created the job (services.do_create_job: the
# wizard's confirm runs again what can change, the API the whole list) stands in for
# this re-check when the claim follows it within REQUEST_CHECK_SECONDS, as migrate_vm
# --wait's own checklist does: the same facts are not read twice within ~50 ms (the claim
# follows the confirm by 20-60 ms) while the browser loads the job page on the same
# machine. A job that waited longer for a worker (a busy queue, an approval, a window) is
# checked again. Batch children are created ahead of their start without this mark and
# are always checked at the claim. libvirt itself refuses the state changes that matter
# in the remaining window (a live move of a shut-off VM, an offline move of a running one).
REQUEST_CHECK_SECONDS = 3


def run_job(job_id, worker=None, *, checked=None, defer_sync=False, ahead_of_it=None, lookahead=None):
    """The task body: claim the job, run it, conclude it. Returns the final status, or
    None when the claim found nothing to do (redelivery, duplicate, cancelled).

    ``manage.py migrate_vm --wait`` calls it in its own process (as virsh's process waits
    on its own migration), through the same claim, journal and heartbeat as a worker:
    ``checked`` is the checklist that process ran for this job moments before creating it
    (the re-check is skipped: it would run the same checks again within a second), and
    ``defer_sync`` queues the two hosts' full inventory sync on the default cluster
    instead of running it before returning (the moved VM is recorded either way).
    A worker chaining batch children (tasks.run_migration) passes ``lookahead`` (the next
    child's re-check, started near this job's end, and this job's conclusion when it
    runs beside the next child's start) and gives it to the next job as ``ahead_of_it``:
    the re-check it ran stands in when it was for that job and is fresh at the claim
    (Lookahead.for_job)."""
    worker = worker or worker_name()
    opening = _open_ahead(job_id)
    try:
        # Queued behind the other jobs' writes (jobrun.writing, never inside a
        # transaction), then in the gates' locks (a batch's limits count other jobs:
        # fleet/limits.py); clears the reason a held job waited for.
        with writing(), claiming(job_id):
            # The clock is read once both waits are over: read before them, a window that
            # closed meanwhile would still let the claim in, and the claim's heartbeat
            # would be as old as the wait (reconcile's stale limit is 10 s).
            now = timezone.now()
            claimed = transition(
                job_id,
                MigrationJob.PREFLIGHT,
                from_=[MigrationJob.QUEUED],
                worker=worker,
                heartbeat_at=now,
                started_at=now,
                waiting_for="",
                where=claim_condition(now, job_id),
                event=("picked_up", {"worker": worker}),
            )
        if not claimed:
            _close_later(opening)
            return _not_claimed(job_id, now)
        job = MigrationJob.objects.select_related("vm", "source", "target").get(pk=job_id)
    except BaseException:
        _close_later(opening)
        raise
    run = JobRun(job, worker)
    run.connections = opening
    run.defer_sync, run.checked = defer_sync, checked
    run.lookahead, run.ahead_of_it = lookahead, ahead_of_it
    run.rechecking = ahead_of_it.for_job(job_id) if ahead_of_it is not None else None
    try:
        _run(run)
    except Cancelled as exc:
        return finish(run, MigrationJob.CANCELLED, exc.parts)
    except Failed as exc:
        return finish(run, MigrationJob.FAILED, exc.parts)
    except Unsettled as exc:
        return hand_to_reconcile(run, str(exc))
    except Exception as exc:  # never leave a job hanging in an active state
        log.exception("job %s crashed", job_id)
        return finish(run, MigrationJob.FAILED, [("err_internal", {"error": str(exc)})])
    finally:
        _close_unused(run)
    return MigrationJob.objects.filter(pk=job_id).values_list("status", flat=True).first()


def _not_claimed(job_id, now):
    """The claim moved nothing: taken, cancelled or gone (nothing to do), or still queued
    but not due: window not open yet, closed, or a blackout (held with the reason)."""
    job = MigrationJob.objects.select_related("source", "target").filter(pk=job_id).first()
    if job is None or job.status != MigrationJob.QUEUED:
        log.info("job %s: not claimed (already taken, cancelled or gone); nothing to do", job_id)
        return None
    if job.not_after and now > job.not_after:
        miss(job, now)
        return None
    # Not due, or a blackout that ended between the claim and now: held either way, the
    # next release_due pass (seconds) queues it again when it may start.
    hold(job_id, why_not_due(job, now) or _("Not due at the worker's claim; checked again shortly."))
    return None


def _open_ahead(job_id):
    """The source host's two connections for a live job that looks claimable, opening in
    a thread while the claim runs (the migration needs them right after it): a few ms
    each on a quiet host, up to 40 ms while a browser loads the job page beside QEMU
    starting on the target (benchmarks/migrate_vs_virsh.py). None for another mode or a
    job the claim will not take as far as its row says (held, taken, ended): a held batch
    child's first message costs no connection. A claim refused after all (a duplicate
    message, a window not open yet) closes them from a thread (_close_later)."""
    row = (
        MigrationJob.objects.filter(pk=job_id, status=MigrationJob.QUEUED, waiting_for="")
        .values_list("mode", "source__uri")
        .first()
    )
    mode = modes.REGISTRY.get(row[0]) if row is not None else None  # no PlanError here
    if mode is None or not mode.live or not row[1]:
        return None
    return _connecting(row[1], job_id)


def _connecting(uri, job_id):
    """The live mode's two source connections (the migrate call's, the monitor's),
    opening in a thread: modes/live.run_live takes them."""
    return Operation(
        lambda: (hv.connect(uri, call_timeout=settings.MIGRATION_TIMEOUT), hv.connect(uri)),
        f"connect job {job_id}",
    )


def _close_unused(run):
    """Close connections opened ahead for a live run that never used them."""
    opening, run.connections = run.connections, None
    _close_opening(opening)


def _close_later(opening):
    """_close_opening in a thread of its own: the claim's caller does not wait for a slow
    host's connections to open only to close them."""
    if opening is not None:
        Operation(lambda: _close_opening(opening), "close unused connections")


def _close_opening(opening):
    if opening is None:
        return
    opening.wait(settings.LIBVIRT_CONNECT_TIMEOUT * 2 + 1)
    if opening.done and opening.error is None:
        for conn in opening.value:
            conn.close()


def _run(run):
    job, checked = run.job, run.checked
    if job.source is None or job.target is None:
        raise Failed(("err_host_removed_before", {}))
    plan = MigrationPlan.from_job(job)
    mode = modes.get(job.mode)
    if mode.live and run.connections is None:
        # Not opened before the claim (runner._open_ahead): open them while the checklist
        # runs (needed right after it; a few ms each, on every live migration's path).
        run.connections = _connecting(job.source.uri, job.pk)
    # No dirty-rate measurement here: convergence was judged (and acknowledged) in the
    # wizard, and measuring again would add a second to every migration. What can change
    # in the meantime (VM state, host reachability, memory, collisions) is re-checked.
    # In a helper thread so this one keeps the heartbeat going (a slow host can make the
    # checklist take up to its timeout, longer than reconcile's stale limit) and writes
    # the "picked up" line meanwhile: every write here is on the migration's critical path.
    now = timezone.now()
    stands = None if checked is not None else request_check(job.preflight, now)
    if checked is not None:
        report, passed = checked, ("preflight_passed_here", {})
    elif stands is not None:
        age = max(0.0, now.timestamp() - job.preflight["at_request"])
        report, passed = stands, ("preflight_at_request", {"age": f"{age:.1f}"})
    else:
        checking = run.rechecking or Operation(
            lambda: recheck(plan, job.preflight), f"preflight job {job.pk}"
        )
        while not checking.wait(POLL_SECONDS):
            run.heartbeat()
        if checking.error is not None:
            raise checking.error
        report, passed = checking.value, ("preflight_passed", {})
    overridden = set(job.overridden or [])
    acknowledged = set(job.acknowledged or [])
    blocking = [f"{r.title}: {r.message}" for r in report.fails if not (r.overridable and r.id in overridden)]
    if blocking:
        run.update(preflight=report.to_dict())
        raise Failed(("err_preflight_blocks", {"checks": "; ".join(blocking), "host": job.source_name}))
    run.mark("preflight_done")
    with writing():
        started = transition(
            job.pk,
            MigrationJob.RUNNING,
            from_=[MigrationJob.PREFLIGHT],
            preflight=report.to_dict(),
            heartbeat_at=timezone.now(),
            event=passed,
        )
    if not started:
        run.update(preflight=report.to_dict())
        raise Cancelled(("err_cancelled_before_migration", {"host": job.source_name}))
    for r in report.warnings:
        if r.id not in acknowledged:
            run.event(("new_warning", {"title": str(r.title), "message": str(r.message)}), "warn")
    if not mode.live and run.ahead_of_it is not None:
        run.ahead_of_it.next_moving()  # a live mode says so at its migrate call (modes/live.py)
    mode.run(run, plan)


class Lookahead:
    """What a worker chaining batch children (tasks.run_migration) does beside the end of
    one: the re-check of the child it will most likely run next (windows.upcoming),
    started as the job before it is about to land (``start``, called when the live
    monitor's ETA is short or libvirt reports its second pass over memory, and again by
    jobrun.conclude_success once the VM has moved), and that job's
    conclusion, run in a thread while the worker claims the next child (``concluding``).
    The next child's start waits for neither. The claim still decides: the re-check is
    used only for the child this worker then claims, and only when it started at most
    REQUEST_CHECK_SECONDS before (``for_job``)."""

    def __init__(self, job_id, chaining=None):
        self.after = job_id
        self.chaining = chaining  # () -> whether the worker will still chain a successor
        self.job_id = None
        self.checking = None
        self.started = None
        # Job ``job_id``'s own conclusion (an Operation), when it runs beside the next
        # child's start (jobrun.conclude_success); the task waits for it before it ends.
        self.concluding = None
        self.plan = None  # the plan the re-check is for
        self.landing_on_target = False  # the early re-check ran while a VM landed on its target
        # Set once the next child's migration started, or none will: the conclusion waits
        # for it (jobrun._conclude_in_thread).
        self.moving = threading.Event()
        # start() runs in the worker's thread and in ones started from libvirt's event
        # loop (modes/live.watch_passes). early() has a lock of its own: the event loop
        # asks it and must never wait for a start() under way.
        self._lock = threading.Lock()
        self._early_lock = threading.Lock()
        self._early_at = None  # when early() last said yes (monotonic)

    def next_moving(self):
        """The next child's migration started, or no next child will start here: the
        conclusion of job ``after`` may write now."""
        self.moving.set()

    def will_chain(self):
        """Whether the worker will look for a next child once this job has concluded."""
        return self.chaining is None or self.chaining()

    def concluded(self):
        """Wait for the conclusion run beside the next child (if any) to end. Bounded by
        its libvirt calls' timeouts; the database writes queue like any job's. Its own
        errors end the job (jobrun._conclude_in_thread); one that escaped that too is
        logged here (the job is then left to reconcile)."""
        self.next_moving()  # no next child waits for it any more
        if self.concluding is not None:
            self.concluding.thread.join()
            if self.concluding.error is not None:
                log.error("job %s: conclusion failed: %s", self.after, self.concluding.error)

    def early(self):
        """True when the caller should start the early re-check
        (``start(before_landing=...)``): the first time it is asked, and again once that
        one is older than REQUEST_CHECK_SECONDS / 2 (the age at which the landing would
        start a new one anyway). Asked by the live monitor when the ETA is short and from
        libvirt's event loop when the second pass over memory begins: of two asking at
        once one gets True, and a big guest whose second pass began long before its
        landing gets a fresh re-check in its last second too."""
        with self._early_lock:
            now = time.monotonic()
            if self._early_at is not None and now - self._early_at <= REQUEST_CHECK_SECONDS / 2:
                return False
            self._early_at = now
            return True

    @property
    def tried_early(self):
        """Whether early() said yes at least once."""
        return self._early_at is not None

    def start_early(self, before_landing):
        """``start(before_landing)`` in a thread of its own (modes/live.watch_passes),
        which closes its database connection."""
        try:
            self.start(before_landing=before_landing)
        finally:
            connections.close_all()

    def start(self, before_landing=None):
        """Start the re-check of the expected next child, unless the worker will not run
        one (stopping, out of chain time) or a fresh one runs already for that child.

        The live mode calls it as the migration is about to land (``early``) with
        ``before_landing`` (this job's target id). For a child bound to that same target, what the landing
        changes there (its free memory, the names it holds: AFTER_LANDING) is checked
        again once the VM has moved, the rest taken from the early re-check. The
        conclusion calls it once the VM has moved: that second look, or a whole re-check
        when the child expected now is another, or the early one is older than half
        REQUEST_CHECK_SECONDS (a VM whose ETA stayed short for seconds). Never raises:
        the next claim re-checks as usual."""
        with self._lock:
            self._start(before_landing)

    def _start(self, before_landing):
        try:
            if not self.will_chain():
                return
            job_id = upcoming(self.after)
            fresh = self.started is not None and time.monotonic() - self.started <= REQUEST_CHECK_SECONDS / 2
            if self.checking is not None and job_id == self.job_id and fresh:
                if before_landing is None and self.landing_on_target:
                    early, plan = self.checking, self.plan
                    self.checking = Operation(lambda: after_landing(early, plan), f"lookahead job {job_id}")
                    self.landing_on_target = False
                return
            job = MigrationJob.objects.select_related("vm", "source", "target").filter(pk=job_id).first()
            if job is None or job.status != MigrationJob.QUEUED or job.source is None or job.target is None:
                return
            plan = MigrationPlan.from_job(job)
            started = time.monotonic()
            self.checking = Operation(lambda: recheck(plan, job.preflight), f"lookahead job {job.pk}")
            self.job_id, self.started, self.plan = job.pk, started, plan
            self.landing_on_target = before_landing is not None and job.target_id == before_landing
        except Exception:
            log.warning("job %s: no look-ahead re-check", self.after, exc_info=True)

    def for_job(self, job_id):
        """The running or finished re-check (an Operation) when it is for ``job_id`` and
        fresh enough to stand in for the claim's own; else None. Asked once the job is
        claimed (runner._run): its age counts the claim's wait for the locks. Not one
        started while a VM was landing on the child's target that never landed (failed,
        cancelled): its free memory was read while that VM's memory was still held there."""
        with self._lock:
            if self.checking is None or job_id != self.job_id or self.landing_on_target:
                return None
            if time.monotonic() - self.started > REQUEST_CHECK_SECONDS:
                return None
            return self.checking


def recheck(plan, stored, now=None):
    """The re-check of ``plan``: the checks of what can change run now, the static ones
    taken from ``stored`` (the checklist dict the job was created with) when it is young
    enough (reusable_results); no dirty-rate measurement (convergence was judged and
    acknowledged on the checklist). Returns the Report; its reused results keep the age
    of the checklist they came from (``reused_from``), so a later re-check may take them
    again within the same limits."""
    reuse = reusable_results(stored, now or timezone.now())
    report = run_preflight(plan, measure_dirty_rate=False, reuse=reuse)
    if reuse:
        report.reused_from = (stored or {}).get("reused_from") or stored["started_at"]
    return report


# What a VM landing on a host changes for the next child bound there: checked again
# once it has landed when the rest was checked just before the landing (Lookahead).
AFTER_LANDING = frozenset({"memory", "collision"})


def after_landing(early, plan):
    """The re-check ``early`` (an Operation, started while a VM was still landing on
    ``plan``'s target) with AFTER_LANDING run again now: one free-memory and one name
    lookup instead of the whole re-check, on the next child's critical path. The report
    lists the others as reused, from ``early``'s anchor (``reused_from``: the checklist
    its static results came from, or its own start), which is all a later re-check may
    reuse them by (only STATIC_CHECKS, reusable_results)."""
    early.wait(None)  # bounded by the checklist's own timeout
    if early.error is not None:
        raise early.error
    report = early.value
    reuse = {r.id: r for r in report.results if r.id not in AFTER_LANDING}
    # The source's view of the VM from the early re-check too: the landing changed the
    # target, and reading the VM again took ~15 ms of this look (a connection and its XML).
    again = run_preflight(plan, measure_dirty_rate=False, reuse=reuse, known=report.facts)
    again.reused_from = report.reused_from or report.started_at
    return again


def request_check(stored, now):
    """The checklist stored with the job (a Report) when it was run for the job's own
    request (``at_request``, epoch seconds) at most REQUEST_CHECK_SECONDS before ``now``;
    else None. A second in the future is another machine's clock (the web server's)."""
    at = (stored or {}).get("at_request")
    if not isinstance(at, int | float) or not -1 <= now.timestamp() - at <= REQUEST_CHECK_SECONDS:
        return None
    return Report.from_dict(stored)


def reusable_results(stored, now):
    """{check id: CheckResult} of STATIC_CHECKS from ``stored`` (the checklist the job was
    created with, as stored on the job) when it ran less than RECHECK_REUSE_SECONDS
    before ``now`` (storage: STORAGE_REUSE_SECONDS); for a re-check, counted from the
    checklist its static results came from (``reused_from``); {} otherwise (no
    checklist, an old one, a re-check that does not say where its results came from)."""
    stored = stored or {}
    # A re-check's static results are as old as the checklist they came from.
    anchor = stored.get("reused_from") if stored.get("reused") else stored.get("started_at")
    try:
        started = datetime.fromisoformat(anchor or "")
    except ValueError:
        return {}
    if started.tzinfo is None:
        return {}
    # A few seconds "in the future" are another machine's clock (the web server's).
    if not timedelta(seconds=-5) <= now - started <= timedelta(seconds=RECHECK_REUSE_SECONDS):
        return {}
    report = Report.from_dict(stored)
    reused = {r.id: r for r in report.results if r.id in STATIC_CHECKS}
    if now - started > timedelta(seconds=STORAGE_REUSE_SECONDS):
        reused.pop("storage", None)
    return reused

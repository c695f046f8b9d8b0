"""What every mode's run shares: the job context (JobRun: row writes, events, progress,
heartbeat, controls), the helper thread for blocking libvirt calls, where libvirt shows
the VM, and the conclusion (success with figures and inventory, or a final state with its
message), all through lifecycle.transition().

Only the helper thread talks to libvirt for a long call; only the job's own thread
touches the database (a batch child's conclusion may run in a thread of its own once its
VM has landed: then that thread is the job's, see ``conclude_success``). libvirt is never
called inside a transaction.
"""

import fcntl
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager

from django.db import connection, connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from hosts import hypervisor as hv
from hosts.models import Host
from hosts.services import apply_inventory, do_sync_inventory
from kvmweb.audit.models import AuditEvent
from migrations_app import events, prediction, states
from migrations_app.lifecycle import transition, write_event
from migrations_app.models import LeftCopy, MigrationJob, ProgressSample
from migrations_app.services import add_event, publish_job

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
# A heartbeat is written at most this often (any progress or row write is one too):
# reconcile calls a job stale after migrations_app/reconcile.STALE_SECONDS (10 s) without
# one. With eight jobs at once on SQLite, a heartbeat every poll (4/s per job) was a third
# of the time the jobs' threads spent waiting for the database's write lock
# (benchmarks/concurrent_migrations.py), and the runner noticed a finished checklist
# only after its heartbeat got the lock.
HEARTBEAT_SECONDS = 2.0
# The longest a landed batch child's conclusion waits for the next child's migration to
# start (_conclude_in_thread); a re-check that outlasts it shares the writers' queue.
CONCLUDE_AFTER_SECONDS = 3.0
# Progress sampling adapts to how many jobs run at once (every worker and process writes
# to the same database): about SAMPLES_PER_SECOND samples a second in all, each job at
# least every MAX_POLL_SECONDS and at most every POLL_SECONDS. One or two jobs: 4/s each;
# eight: 1/s each. The count is read again every COUNT_SECONDS. A finished migration call
# is noticed at once whatever the interval (the monitor waits on it), and so is a
# control request on the next sample.
SAMPLES_PER_SECOND = 8
MAX_POLL_SECONDS = 1.0
COUNT_SECONDS = 2.0
STARTING_UP_SECONDS = 60
MIB = 1048576


def worker_name():
    return f"{socket.gethostname()}:{os.getpid()}"


_writer = threading.local()
_unusable = set()  # lock files that could not be opened (warned about once)


def writers_lock_path():
    """The writers' lock file of a SQLite database file (next to it), or None: another
    database, or an in-memory one (nobody else writes to it)."""
    if connection.vendor != "sqlite":
        return None
    name = str(connection.settings_dict["NAME"])
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return f"{name}-writers.lock"


def _without_lock(depth):
    """writing() nested in itself or in a transaction, or with no lock to take."""
    _writer.depth = depth + 1
    try:
        yield True
    finally:
        _writer.depth = depth


@contextmanager
def writing(wait=True):
    """Around one write transaction of a job's thread: on SQLite, queue behind the other
    jobs' writes on a lock file next to the database (``fcntl.flock``), then write.
    Yields True; with ``wait=False`` yields False at once when another job is writing
    (the caller skips a write that can wait: a progress sample).

    SQLite has one write lock, and a writer that finds it taken polls for it, sleeping up
    to 100 ms between tries: with eight jobs at once on a busy machine the newest writer
    kept winning it and a job's claim, conclusion or progress write waited up to 3 s
    (benchmarks/concurrent_migrations.py). A blocked flock wakes as soon as the holder is
    done. Taken only at the start of a transaction (never inside one: a thread holding the
    database's lock must not wait for this one) and only by these writes and the batch
    scheduler's (fleet/scheduler.py, fleet/limits.py successor: left out, they lost the
    lock again and again to the queued writers); other writers (web requests, the queue)
    still meet them on SQLite's own lock, as before. The kernel
    drops it with its process. Nothing to do on other databases."""
    depth = getattr(_writer, "depth", 0)
    path = None if depth or connection.in_atomic_block else writers_lock_path()
    if path is None:
        yield from _without_lock(depth)
        return
    try:
        # Read-only is enough for flock: a process of another user (migrate_vm run by an
        # administrator) can share a lock file the workers' user created.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as exc:  # a lock file we may not open: write as before, unqueued
        if path not in _unusable:  # once per file, not on every write
            _unusable.add(path)
            log.warning("writers' lock %s unusable (%s); writing without it", path, exc)
        yield from _without_lock(depth)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        _writer.depth = 1
        try:
            yield True
        finally:
            _writer.depth = 0
    finally:
        os.close(fd)  # releases the lock


class _Coded(Exception):
    """An error whose message is a text, a (code, params) pair of migrations_app/events.py
    or a list of them (shown in each viewer's language; str() is English)."""

    @property
    def parts(self):
        first = self.args[0] if self.args else ""
        return events.parts(*first) if isinstance(first, list) else events.parts(first)

    def __str__(self):
        return events.english(self.parts)


class Cancelled(_Coded):
    """The user cancelled; the message says where the VM is."""


class Failed(_Coded):
    """The job failed; the message says what happened and where the VM is."""


class Unsettled(Exception):
    """settle() could not reach a host: the job stays for reconcile to try again."""


class Operation:
    """A blocking call in a helper thread; ``wait(t)`` returns True once it ended."""

    def __init__(self, fn, name):
        self.fn = fn
        self.error = None
        self.value = None
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the monitoring thread
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout):
        return self._done.wait(timeout)

    @property
    def done(self):
        return self._done.is_set()


class Convergence:
    """Whether a pre-copy migration can still finish, judged on every progress sample.

    It can when what remains to send fits in the allowed downtime at the current rate
    (remaining <= rate x downtime), or is shrinking towards that. It cannot when pass after
    pass the remaining data does not shrink (a stall: the guest dirties memory as fast as
    it is sent) while it does not fit: then the ETA is a lie, and the user must act
    (raise the bandwidth, raise the downtime, switch to post-copy, cancel).
    """

    DEFAULT_DOWNTIME_MS = 300  # QEMU's default maximum downtime
    STALL_PASSES = 3  # passes without the remaining data shrinking by 5 %
    FIT_SAMPLES = 8  # samples (about 2 s) in which what remains fits, to say "converging again"

    def __init__(self):
        self.pass_start = {}  # iteration -> remaining data when that pass began
        self.converging = True
        self.fitting = 0  # consecutive samples in which what remains fits

    def judge(self, fields, downtime_ms):
        """Returns (converging, details) for one sample; details has the figures."""
        iteration = fields.get("iteration", 0)
        remaining = fields.get("memory_remaining") or fields.get("data_remaining", 0)
        rate = fields.get("rate", 0)
        self.pass_start.setdefault(iteration, remaining)
        downtime_ms = downtime_ms or self.DEFAULT_DOWNTIME_MS
        fits = rate * downtime_ms / 1000
        details = {
            "remaining": remaining,
            "rate": rate,
            "fits": fits,
            "downtime_ms": downtime_ms,
            "stalled": False,
        }
        self.fitting = self.fitting + 1 if rate and remaining <= fits else 0
        if not self.converging:
            # Once stuck, only what remains fitting for a while counts as converging again:
            # the remaining data jumps around, and the verdict must not flip with it.
            return self.fitting >= self.FIT_SAMPLES, details
        if iteration < 2 or not rate or remaining <= fits:
            return True, details
        earlier = self.pass_start.get(iteration - self.STALL_PASSES)
        recent = [
            self.pass_start[i]
            for i in range(iteration - self.STALL_PASSES + 1, iteration + 1)
            if i in self.pass_start
        ]
        stalled = earlier is not None and bool(recent) and min(recent) >= earlier * 0.95
        dirty = fields.get("dirty_rate", 0)
        details["stalled"] = stalled
        return not (stalled or (dirty and dirty >= rate)), details


class JobRun:
    """Everything one run of one job needs; the methods write the row and wake watchers."""

    def __init__(self, job, worker):
        self.job = job
        self.job_id = job.pk
        self.worker = worker
        self.t0 = time.monotonic()
        self.applied = {}  # control requests already applied
        self.stop_copy = threading.Event()
        self.last_phase = None
        self.last_iteration = 0
        self.convergence = Convergence()
        self.marks = {}  # name -> ms since the claim (where the time goes)
        self.connections = None  # source connections opened while the checklist runs
        self.defer_sync = False  # full inventory sync queued, not run (runner.run_job)
        self.checked = None  # the checklist the caller just ran, instead of the re-check
        self.lookahead = None  # the next child's re-check and this job's conclusion (runner.Lookahead)
        self.landed_at = None  # written when the conclusion runs beside the next child's start
        self.rechecking = None  # this job's re-check, started by the job before (Lookahead)
        self.ahead_of_it = None  # the Lookahead of the job before, whose conclusion waits for this start
        self.beat_at = self.t0  # when the last heartbeat was written (the claim wrote one)
        self.counted_at = None  # when poll_seconds last counted the running jobs
        self.interval = POLL_SECONDS
        self.sampled = 0  # progress samples written

    def mark(self, name):
        self.marks[name] = round((time.monotonic() - self.t0) * 1000)

    # -- row writes

    def update(self, **fields):
        now = timezone.now()
        with writing():
            MigrationJob.objects.filter(pk=self.job_id).update(
                **fields, heartbeat_at=now, progress_seq=F("progress_seq") + 1
            )
        self.beat_at = time.monotonic()
        publish_job(self.job_id)

    def event(self, message, level="info"):
        with writing():
            add_event(self.job_id, message, level)
        publish_job(self.job_id)

    def progress(self, fields, sample=True, mark="", optional=False):
        """One progress write (row + chart sample, ``mark`` labels a convergence-ladder
        step on the chart) and the phase/iteration events, in one transaction: on SQLite
        each transaction waits for the one write lock every job shares. ``optional``: not
        written when another job is writing right now (the next sample follows within a
        second) unless the last heartbeat is HEARTBEAT_SECONDS old; returns whether it
        was written. With eight jobs at once, a claim or a conclusion then waits behind
        fewer progress samples. A job's first sample is always written (a short
        migration would otherwise end without any)."""
        overdue = time.monotonic() - self.beat_at >= HEARTBEAT_SECONDS
        with writing(wait=not optional or overdue or not self.sampled) as free:
            if not free:
                return False
            self._progress(fields, sample, mark)
        publish_job(self.job_id)
        return True

    def _progress(self, fields, sample, mark):
        now = timezone.now()
        with transaction.atomic():
            MigrationJob.objects.filter(pk=self.job_id).update(
                **fields, progress_at=now, heartbeat_at=now, progress_seq=F("progress_seq") + 1
            )
            if sample:
                ProgressSample.objects.create(
                    job_id=self.job_id,
                    t=round(time.monotonic() - self.t0, 3),
                    rate=fields.get("rate", 0),
                    remaining=fields.get("memory_remaining") or fields.get("data_remaining", 0),
                    processed=fields.get("data_processed", 0),
                    dirty_rate=fields.get("dirty_rate", 0),
                    iteration=fields.get("iteration", 0),
                    mark=mark,
                )
                self.sampled += 1
            phase = fields.get("phase")
            if phase and phase != self.last_phase:
                write_event(self.job_id, ("phase", {"phase": phase}))
            iteration = fields.get("iteration", 0)
            if iteration > self.last_iteration and iteration > 1:
                # One line per job, updated in place: a job that makes 1,000 passes must
                # not grow its page by 1,000 lines.
                write_event(self.job_id, ("memory_pass", {"iteration": iteration}))
        self.last_phase = phase or self.last_phase
        self.last_iteration = max(self.last_iteration, iteration)
        self.beat_at = time.monotonic()

    def poll_seconds(self):
        """How long to wait before the next progress sample (see SAMPLES_PER_SECOND);
        POLL_SECONDS until the job's first sample is written."""
        if not self.sampled:
            return POLL_SECONDS
        now = time.monotonic()
        if self.counted_at is None or now - self.counted_at >= COUNT_SECONDS:
            self.counted_at = now
            running = MigrationJob.objects.filter(status__in=states.WORKING).count()
            self.interval = min(MAX_POLL_SECONDS, max(POLL_SECONDS, running / SAMPLES_PER_SECOND))
        return self.interval

    def heartbeat(self, force=False):
        """Tell reconcile this worker is alive: written when the last one is older than
        HEARTBEAT_SECONDS (or ``force``), otherwise nothing to do."""
        if not force and time.monotonic() - self.beat_at < HEARTBEAT_SECONDS:
            return
        with writing():
            MigrationJob.objects.filter(pk=self.job_id).update(heartbeat_at=timezone.now())
        self.beat_at = time.monotonic()

    def controls(self):
        """The control fields as they are on the row now."""
        return (
            MigrationJob.objects.filter(pk=self.job_id)
            .values(
                "status",
                "cancel_requested",
                "requested_bandwidth",
                "requested_downtime",
                "postcopy_requested",
                "force_off_requested",
                "force_off_requested_by",
            )
            .first()
        )


def where_is(job):
    """Ask both hosts about the VM: {"source": (state, reason)|None|"unreachable", ...}."""
    uuid = str(job.vm.uuid)
    found = {}
    for side, host in (("source", job.source), ("target", job.target)):
        try:
            with hv.session(host.uri, timeout=3) as c:
                found[side] = c.find_domain(uuid)
                if found[side] is not None and found[side][0] != "shutoff":
                    try:  # an inactive domain has no job (and jobStats refuses it)
                        found[side + "_job"] = c.job_stats(uuid)["type"]
                    except hv.DomainNotFound:
                        found[side] = None
                    except hv.HypervisorError:
                        found[side + "_job"] = "unknown"
        except hv.HypervisorError as exc:
            found[side] = "unreachable"
            found[side + "_error"] = str(exc)
    return found


def state_words(state):
    if state in (None, "unreachable"):
        return ""
    name, _reason = state
    return {"running": "running", "paused": "paused", "shutoff": "shut off"}.get(name, name)


def disk_paths(vm):
    return [d["source"] for d in vm.disks if d.get("device", "disk") == "disk" and d.get("source")]


def blocking(run, fn, what):
    op = Operation(fn, f"{what} job {run.job_id}")
    while not op.wait(POLL_SECONDS):
        run.heartbeat()
    if op.error is not None:
        raise op.error
    return op.value


def conclude_success(run, stats=None, extra=None, *, live=False):
    """Record success: final figures, the VM row moved to the target (location trail
    "migration") in the same pass that reads the completed-job statistics, the job row,
    the audit event; then both hosts' inventories (nothing there decides the outcome).
    Only the moved VM is read before the job ends: listing every domain of a busy target
    took up to a second and held the batch slot (benchmarks/evacuate.py).
    ``live``: read libvirt's completed-job statistics and learn the link speed from them.

    A live batch child whose worker will run the next child (``run.lookahead``, see
    runner.Lookahead) concludes beside that child's start: the row says "landed" first
    (one write: a landed job fills no slot of the limits, fleet/limits.py, as its
    migration stream is over and the VM runs on the target), the next child's re-check
    starts (unless it started as the migration was about to land; for a child
    bound to this target, what the landing changes there is looked at again: runner.
    after_landing), and the rest of the conclusion runs in a thread of its own, once the
    next child's migration has started, while this thread returns to claim it.
    Concluded one after the other, the conclusion (statistics, the VM's record, the
    final write, its audit line: 70-270 ms with two migrations running) sat between
    every two children of a lane. A worker killed meanwhile leaves a running job whose
    VM libvirt shows on the target: reconcile concludes it succeeded, as for any worker
    killed after the move."""
    ahead = run.lookahead
    if live and ahead is not None and ahead.will_chain():
        run.landed_at = timezone.now()
        run.update(phase=states.LANDED, landed_at=run.landed_at)
        run.mark("landed")
        ahead.start()
        ahead.concluding = Operation(
            lambda: _conclude_in_thread(run, stats, extra), f"conclude job {run.job_id}"
        )
        return
    if ahead is not None:
        ahead.start()
    _conclude_success(run, stats, extra, live=live)


def _conclude_in_thread(run, stats, extra):
    """The conclusion of a landed job in a thread of its own (conclude_success); it ends
    the job as runner.run_job would when it fails, and closes this thread's database
    connection.

    It first waits until the next child's migration has started, or will not (runner.
    Lookahead.next_moving), for at most CONCLUDE_AFTER_SECONDS. Run at once, its reads and
    its three writes (the final one, the prediction aid, the queued sync) took the
    writers' queue and the CPU between the next child's claim and its libvirt call; run
    while that migration streams, they cost its lane nothing. The landed job already
    shows "landed" meanwhile and holds no slot of the limits (fleet/limits.py); the
    batch's own pass still counts it for its first seconds (scheduler.LANDED_GRACE).
    The heartbeat after the wait keeps reconcile's stale limit away from a conclusion
    whose target then answers slowly."""
    try:
        run.lookahead.moving.wait(CONCLUDE_AFTER_SECONDS)
        run.heartbeat()
        _conclude_success(run, stats, extra, live=True)
    except Exception as exc:  # never leave a job hanging in an active state
        log.exception("job %s: conclusion crashed", run.job_id)
        finish(run, MigrationJob.FAILED, [("err_internal", {"error": str(exc)})])
    finally:
        connections.close_all()  # this thread's own connections


def _conclude_success(run, stats, extra, *, live):
    job = run.job
    if stats is None:
        stats = {}
    records = None
    try:
        with hv.session(job.target.uri) as dst:
            if live and not stats:
                try:
                    stats = dst.job_stats(str(job.vm.uuid), completed=True)
                except hv.HypervisorError as exc:
                    run.event(("stats_unreadable", {"error": str(exc)}), "warn")
            records = [dst.domain_record(str(job.vm.uuid))]
    except hv.HypervisorError as exc:
        run.event(("sync_failed", {"host": job.target_name, "error": str(exc)}), "warn")
    result = {
        "downtime_ms": stats.get("downtime"),
        "elapsed_ms": stats.get("time_elapsed"),
        "data_processed": stats.get("data_processed"),
        "memory_processed": stats.get("memory_processed"),
        "disk_processed": stats.get("disk_processed"),
        "memory_iterations": stats.get("memory_iteration"),
    }
    result.update(extra or {})
    if live:
        result["link_mibs"] = link_sample(job, stats, until=run.landed_at)
    run.mark("concluded")
    result["timing_ms"] = dict(run.marks)
    fields = {
        "phase": "done",
        "percent": 100.0,
        "data_remaining": 0,
        "memory_remaining": 0,
        "disk_remaining": 0,
        "eta_seconds": 0,
        "downtime_ms": stats.get("downtime"),
        "elapsed_ms": stats.get("time_elapsed") or int((time.monotonic() - run.t0) * 1000),
        "result": {k: v for k, v in result.items() if v is not None},
    }
    if stats.get("data_processed"):
        fields["data_processed"] = stats["data_processed"]
    if stats.get("memory_total"):
        # A short migration on a busy worker can end before any progress poll saw its
        # RAM phase (seen with 8 concurrent jobs on 2 CPUs): the completed statistics
        # still say how much memory the guest had.
        fields["memory_total"] = stats["memory_total"]
    # One transaction: the VM row moved to the target, the job's final state and its
    # audit event. On SQLite each transaction waits for the write lock all running jobs
    # share: three of them here took up to 3 s with eight jobs at once.
    host = Host.objects.get(pk=job.target_id) if records is not None else None
    with writing(), transaction.atomic():
        if records is not None:
            apply_inventory(host, records, via="migration", partial=True)
        finish(run, MigrationJob.SUCCEEDED, "", **fields)
    if live:  # a prediction aid (fixed costs per host pair): after the job ended
        with writing():
            prediction.record(job, stats, result["link_mibs"])
    if run.defer_sync:
        queue_sync(job)
    else:
        sync_after(job)


def queue_sync(job):
    """Both hosts' full inventory sync as a task of the default cluster (what
    conclude_success runs inline for a worker). For ``migrate_vm --wait``, which runs the
    job in its own process: the user waits for the process to exit, and a listing of every
    domain of both hosts decides nothing about the job (the moved VM's row was applied
    before the job ended). Without a default cluster the periodic sync catches up."""
    from django_q.tasks import async_task

    try:
        with writing():  # the queue's row: a write like the job's own
            async_task("migrations_app.tasks.sync_hosts_after_job", job.pk, task_name=f"sync-after-{job.pk}")
    except Exception:  # a queue that cannot take it: the periodic sync catches up
        log.warning("job %s: could not queue the inventory sync", job.pk, exc_info=True)


def sync_after(job):
    """Sync the target's then the source's inventory; a host that does not answer leaves
    a warning line on the job.

    A host on which another job is still under way is left to that job: the last of them
    to end lists it (this job's VM row was moved before it ended; one that fails or is
    cancelled queues this sync as it ends: finish). Eight jobs over four hosts made
    sixteen full listings, each writing while the other jobs waited for SQLite's write
    lock to conclude (benchmarks/concurrent_migrations.py). Read after this job's final
    state was committed, so of two jobs ending together at least the later one syncs."""
    busy = set()
    for pair in (
        MigrationJob.objects.filter(status__in=states.WORKING)
        .exclude(pk=job.pk)
        .filter(
            Q(source_id__in=[job.source_id, job.target_id]) | Q(target_id__in=[job.source_id, job.target_id])
        )
        .values_list("source_id", "target_id")
    ):
        busy.update(pair)
    for host_id, name in ((job.target_id, job.target_name), (job.source_id, job.source_name)):
        if host_id in busy:
            log.info("job %s: %s's inventory is left to a job still under way there", job.pk, name)
            continue
        host = Host.objects.filter(pk=host_id).first()
        if host is None:
            continue
        summary = do_sync_inventory(host)
        if summary.get("error"):
            add_event(job.pk, ("sync_failed", {"host": name, "error": str(summary["error"])}), "warn")
            publish_job(job.pk)


def link_sample(job, stats, until=None):
    """What this job says about the link between its hosts, in MiB/s (bytes moved / time),
    or None when it says nothing: a bandwidth cap (set at the start or on the way) or
    another migration sharing a host at the same time would understate the link, and
    one capped job must never make later preflights predict that nothing converges.
    ``until``: when this job's stream ended (its landing, for a batch child concluded
    beside the next child's start, which is claimed meanwhile); else now. A job that
    had landed before this one started streamed nothing beside it."""
    capped = (job.options or {}).get("bandwidth") or MigrationJob.objects.filter(
        pk=job.pk, requested_bandwidth__gt=0
    ).exists()
    data, elapsed = stats.get("data_processed") or 0, (stats.get("time_elapsed") or 0) / 1000
    if capped or not data or elapsed <= 0:
        return None
    hosts = [job.source_id, job.target_id]
    streamed_until = Q(landed_at__gte=job.started_at) | Q(
        Q(landed_at__isnull=True), Q(finished_at__isnull=True) | Q(finished_at__gte=job.started_at)
    )
    overlapping = (
        MigrationJob.objects.exclude(pk=job.pk)
        .filter(Q(source_id__in=hosts) | Q(target_id__in=hosts), started_at__lte=until or timezone.now())
        .filter(streamed_until)
        .exclude(status__in=[MigrationJob.PENDING_APPROVAL, MigrationJob.QUEUED, MigrationJob.REJECTED])
    )
    if overlapping.exists():
        return None
    return round(data / elapsed / MIB, 1)


def record_left_copies(job, paths):
    """Record the source disks a move left behind (idempotent: reconcile may repeat)."""
    for path in paths:
        LeftCopy.objects.get_or_create(
            vm=job.vm,
            host=job.source,
            path=path,
            job=job,
            removed_at=None,
            defaults={"host_name": job.source_name},
        )


def verify_moved(run, running):
    """After the move: the target has the VM (running when asked), the source does not.
    A VM libvirt still reports as starting up is given time to finish (under load QEMU
    may take seconds to leave "paused (starting_up)")."""
    job = run.job
    deadline = time.monotonic() + STARTING_UP_SECONDS
    while True:
        where = where_is(job)
        dst, src = where.get("target"), where.get("source")
        starting = dst not in (None, "unreachable") and tuple(dst) == ("paused", "starting_up")
        if not (running and starting) or time.monotonic() > deadline:
            break
        run.heartbeat()
        time.sleep(POLL_SECONDS)
    if dst in (None, "unreachable"):
        raise Failed(("err_verify_missing", {"host": job.target_name}))
    if running and dst[0] != "running":
        raise Failed(
            ("err_verify_not_running", {"state": state_words(dst), "reason": dst[1], "host": job.target_name})
        )
    if src not in (None, "unreachable") and job.options.get("undefine_source", True):
        run.event(("definition_left", {"host": job.source_name, "state": state_words(src)}), "warn")
    run.event(("verified", {"state": state_words(dst), "host": job.target_name}))


def hand_to_reconcile(run, why):
    """The worker cannot finish now (a host stopped answering while settling): leave the
    job to reconcile, which settles it from the journal once the hosts answer."""
    transition(
        run.job_id,
        MigrationJob.NEEDS_RECONCILE,
        from_=states.WORKING,
        event=f"{why} Reconcile will finish or undo the job once the hosts answer.",
        level="warn",
    )
    return MigrationJob.NEEDS_RECONCILE


def finish(run, status, error, **fields):
    """Conclude the job (first finisher wins) with its log line and audit event."""
    job = run.job
    now = timezone.now()
    held = tuple(s for s in states.WORKING + (states.NEEDS_RECONCILE,) if s in states.sources_of(status))
    level = {MigrationJob.SUCCEEDED: "info", MigrationJob.CANCELLED: "warn"}.get(status, "error")
    if status == MigrationJob.SUCCEEDED:
        downtime, elapsed = fields.get("downtime_ms"), fields.get("elapsed_ms")
        moved = (fields.get("result") or {}).get("data_processed")
        params = {"host": job.target_name}
        if downtime is not None and elapsed is not None and moved:
            params.update(downtime=downtime, total=f"{elapsed / 1000:.2f}", moved=f"{moved / MIB:.1f}")
            message = ("succeeded_figures", params)
        elif elapsed is not None:
            message = ("succeeded_total", dict(params, total=f"{elapsed / 1000:.2f}"))
        else:
            message = ("succeeded", params)
    else:
        message = error
    error_parts = []
    if isinstance(error, list | tuple):
        # Coded sentences: stored with their English text, shown in the viewer's language.
        error_parts = events.parts(*(error if isinstance(error, list) else [error]))
        error = message = events.english(error_parts)
    with writing():
        done = transition(
            job.pk,
            status,
            from_=held,
            error=error,
            error_parts=error_parts,
            finished_at=now,
            heartbeat_at=now,
            event=message,
            level=level,
            audit="migration.finish",
            outcome=AuditEvent.SUCCESS if status == MigrationJob.SUCCEEDED else AuditEvent.FAILURE,
            details={
                "error": error,
                "downtime_ms": fields.get("downtime_ms"),
                "elapsed_ms": fields.get("elapsed_ms"),
                "result": fields.get("result") or {},
                "worker": run.worker,
            },
            **fields,
        )
    if not done:
        return MigrationJob.objects.filter(pk=job.pk).values_list("status", flat=True).first()
    if status != MigrationJob.SUCCEEDED and "preflight_done" in run.marks:
        # A job that succeeded beside this one left these hosts' full sync to it
        # (sync_after lists a host only once no job is under way there): this end, too,
        # has them listed, by a task of the default cluster, once the job got past its
        # checklist (one refused there touched no host and made nobody wait for it).
        # Before, only the periodic sync caught up after a failure.
        queue_sync(job)
    return status

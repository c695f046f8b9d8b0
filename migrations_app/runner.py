"""The migration worker: runs one MigrationJob against real libvirt.

Shape of a run (docs/architecture.md):

1. Claim: ``filter(pk=…, status=QUEUED).update(status=PREFLIGHT, worker=…)``. 0 rows means
   another delivery of the same message (or a cancel) got there first: do nothing. This is
   what makes a redelivered or duplicated task harmless; a migration is never started twice.
2. Preflight again, right before starting (the world may have changed since the wizard);
   a blocking result fails the job with the new report stored.
3. The blocking libvirt operation (migrateToURI3, or the cold-mode volume copy) runs in a
   helper thread; this thread polls the source's jobStats about 4×/s, writes progress to
   the job row (+ a ProgressSample, + JobEvents), heartbeats, and applies the controls
   (cancel → abortJob, bandwidth, max downtime, post-copy) requested on the row.
4. Conclude from what libvirt says: completed stats from the target, inventory of both
   hosts synced (location trail "migration"), audit event with the final figures, and a
   failure message that says in plain words where the VM is.

Only the helper thread talks to libvirt for the long call; only this thread touches the
database. libvirt is never called inside a transaction.
"""

import logging
import os
import socket
import threading
import time

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from hosts import hypervisor as hv
from hosts.models import Host
from hosts.services import apply_inventory, do_sync_inventory
from kvmweb.audit.models import AuditEvent
from migrations_app import states
from migrations_app.journal import Journal
from migrations_app.lifecycle import transition, write_event
from migrations_app.models import LeftCopy, MigrationJob, ProgressSample
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight
from migrations_app.services import add_event, publish_job

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
SHUTDOWN_POLL_SECONDS = 0.25
MIB = 1048576


def worker_name():
    return f"{socket.gethostname()}:{os.getpid()}"


class Cancelled(Exception):
    """The user cancelled; the message says where the VM is."""


class Failed(Exception):
    """The job failed; the message says what happened and where the VM is."""


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


# ---------------------------------------------------------------------- progress maths


def progress_from_stats(stats, state=None):
    """Job-row progress fields from one jobStats() dict (and the domain's (state, reason)).

    libvirt facts this relies on: data_total is 0 for the first ~250 ms (setup);
    processed/total never reaches 100 % because zero pages are skipped, so the percentage
    comes from data_remaining; with storage copy a disk phase comes first and data_total
    grows when the RAM phase starts; memory_dirty_rate is in pages per second.
    """
    g = stats.get
    data_total, data_remaining = g("data_total", 0), g("data_remaining", 0)
    disk_total, disk_remaining = g("disk_total", 0), g("disk_remaining", 0)
    memory_processed = g("memory_processed", 0)
    iteration = g("memory_iteration", 0)
    page = g("memory_page_size", 4096) or 4096
    dirty = int(g("memory_dirty_rate", 0) * page)
    rate = g("memory_bps", 0) or g("disk_bps", 0)
    state_name, reason = state or ("", "")
    if state_name == "paused" and reason == "postcopy" or reason == "postcopy":
        phase = "post-copy"
    elif state_name == "paused" and reason == "migration":
        phase = "completing"
    elif data_total == 0:
        phase = "setup"
    elif disk_total and disk_remaining and not memory_processed:
        phase = "disk copy"
    else:
        phase = "memory"
    percent = 0.0
    if data_total:
        percent = max(0.0, min(99.9, 100.0 * (data_total - data_remaining) / data_total))
    eta = None
    if rate and data_total:
        if iteration > 1 and dirty >= rate:
            eta = None  # dirtying as fast as we copy: no honest ETA (may never converge)
        else:
            eta = round(data_remaining / rate, 1)
    return {
        "phase": phase,
        "percent": round(percent, 1),
        "data_total": data_total,
        "data_processed": g("data_processed", 0),
        "data_remaining": data_remaining,
        "memory_total": g("memory_total", 0),
        "memory_processed": memory_processed,
        "memory_remaining": g("memory_remaining", 0),
        "disk_total": disk_total,
        "disk_processed": g("disk_processed", 0),
        "disk_remaining": disk_remaining,
        "rate": int(rate),
        "dirty_rate": dirty,
        "iteration": iteration,
        "eta_seconds": eta,
    }


def _offline_flags(plan):
    """The definition move always goes PEER2PEER: migrateToURI3 has no client-driven
    ("direct") variant ("direct migration is not supported by the source host")."""
    return plan.flags() | hv.MIGRATE_FLAGS["peer2peer"]


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

    def __init__(self):
        self.pass_start = {}  # iteration -> remaining data when that pass began
        self.converging = True

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


# ---------------------------------------------------------------------- the job context


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

    def mark(self, name):
        self.marks[name] = round((time.monotonic() - self.t0) * 1000)

    # -- row writes

    def update(self, **fields):
        now = timezone.now()
        MigrationJob.objects.filter(pk=self.job_id).update(
            **fields, heartbeat_at=now, progress_seq=F("progress_seq") + 1
        )
        publish_job(self.job_id)

    def event(self, message, level="info"):
        add_event(self.job_id, message, level)
        publish_job(self.job_id)

    def progress(self, fields, sample=True):
        """One progress write (row + chart sample) and the phase/iteration events."""
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
                )
        phase = fields.get("phase")
        if phase and phase != self.last_phase:
            self.last_phase = phase
            write_event(self.job_id, ("phase", {"phase": phase}))
        iteration = fields.get("iteration", 0)
        if iteration > self.last_iteration and iteration > 1:
            # One line per job, updated in place: a job that makes 1,000 passes must not
            # grow its page by 1,000 lines.
            write_event(self.job_id, ("memory_pass", {"iteration": iteration}))
        self.last_iteration = max(self.last_iteration, iteration)
        publish_job(self.job_id)

    def heartbeat(self):
        MigrationJob.objects.filter(pk=self.job_id).update(heartbeat_at=timezone.now())

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
            )
            .first()
        )


# ---------------------------------------------------------------------- entry points


def run_job(job_id, worker=None):
    """The task body: claim the job, run it, conclude it. Returns the final status, or
    None when the claim found nothing to do (redelivery, duplicate, cancelled)."""
    worker = worker or worker_name()
    now = timezone.now()
    claimed = transition(
        job_id,
        MigrationJob.PREFLIGHT,
        from_=[MigrationJob.QUEUED],
        worker=worker,
        heartbeat_at=now,
        started_at=now,
        event=("picked_up", {"worker": worker}),
    )
    if not claimed:
        log.info("job %s: not claimed (already taken, cancelled or gone); nothing to do", job_id)
        return None
    job = MigrationJob.objects.select_related("vm", "source", "target").get(pk=job_id)
    run = JobRun(job, worker)
    try:
        _run(run)
    except Cancelled as exc:
        return _finish(run, MigrationJob.CANCELLED, str(exc))
    except Failed as exc:
        return _finish(run, MigrationJob.FAILED, str(exc))
    except Unsettled as exc:
        return _hand_to_reconcile(run, str(exc))
    except Exception as exc:  # never leave a job hanging in an active state
        log.exception("job %s crashed", job_id)
        return _finish(run, MigrationJob.FAILED, f"Internal error in the worker: {exc}")
    finally:
        _close_unused(run)
    return MigrationJob.objects.filter(pk=job_id).values_list("status", flat=True).first()


def _close_unused(run):
    """Close connections opened ahead for a live run that never used them."""
    opening, run.connections = run.connections, None
    if opening is None:
        return
    opening.wait(settings.LIBVIRT_CONNECT_TIMEOUT * 2 + 1)
    if opening.done and opening.error is None:
        for conn in opening.value:
            conn.close()


def _run(run):
    job = run.job
    if job.source is None or job.target is None:
        raise Failed("The source or target host was removed from kvmweb before the job started.")
    plan = MigrationPlan.from_job(job)
    if job.mode in (MigrationJob.LIVE, MigrationJob.LIVE_COPY):
        # Open the source connections while the checklist runs (they are needed right
        # after it; a few ms each, on the critical path of every live migration).
        run.connections = Operation(
            lambda: (
                hv.connect(job.source.uri, call_timeout=settings.MIGRATION_TIMEOUT),
                hv.connect(job.source.uri),
            ),
            f"connect job {job.pk}",
        )
    # No dirty-rate measurement here: convergence was judged (and acknowledged) in the
    # wizard, and measuring again would add a second to every migration. What can change
    # in the meantime (VM state, host reachability, memory, collisions) is re-checked.
    # In a helper thread so this one keeps the heartbeat going (a slow host can make the
    # checklist take up to its timeout, longer than reconcile's stale limit) and writes
    # the "picked up" line meanwhile: every write here is on the migration's critical path.
    checking = Operation(lambda: run_preflight(plan, measure_dirty_rate=False), f"preflight job {job.pk}")
    while not checking.wait(POLL_SECONDS):
        run.heartbeat()
    if checking.error is not None:
        raise checking.error
    report = checking.value
    overridden = set(job.overridden or [])
    acknowledged = set(job.acknowledged or [])
    blocking = [f"{r.title}: {r.message}" for r in report.fails if not (r.overridable and r.id in overridden)]
    if blocking:
        run.update(preflight=report.to_dict())
        raise Failed(
            "The preflight checklist now blocks this migration (checked again right before "
            f"starting): {'; '.join(blocking)}. Nothing was changed; the VM is still on {job.source_name}."
        )
    run.mark("preflight_done")
    started = transition(
        job.pk,
        MigrationJob.RUNNING,
        from_=[MigrationJob.PREFLIGHT],
        preflight=report.to_dict(),
        heartbeat_at=timezone.now(),
        event=("preflight_passed", {}),
    )
    if not started:
        run.update(preflight=report.to_dict())
        raise Cancelled(
            f"Cancelled before the migration started; the VM was not touched and is on {job.source_name}."
        )
    for r in report.warnings:
        if r.id not in acknowledged:
            run.event(("new_warning", {"title": str(r.title), "message": str(r.message)}), "warn")
    if job.mode in (MigrationJob.LIVE, MigrationJob.LIVE_COPY):
        _run_live(run, plan)
    elif job.mode == MigrationJob.COLD:
        _run_cold(run, plan)
    elif job.mode == MigrationJob.OFFLINE:
        _run_offline(run, plan)
    else:
        raise Failed(f"Unknown mode {job.mode!r}.")


# ---------------------------------------------------------------------- live modes


def _disk_paths(vm):
    return [d["source"] for d in vm.disks if d.get("device", "disk") == "disk" and d.get("source")]


def _run_live(run, plan):
    job = run.job
    uuid = str(job.vm.uuid)
    src_uri, dst_uri = job.source.uri, job.target.uri
    flags = plan.flags()
    params = dict(plan.params())
    if job.mode == MigrationJob.LIVE_COPY:
        _prepare_target_volumes(run)
    opening = getattr(run, "connections", None)
    try:
        if opening is not None:
            opening.wait(settings.LIBVIRT_CONNECT_TIMEOUT * 2 + 1)
            if opening.error is not None:
                raise opening.error
            if not opening.done:
                raise hv.HypervisorTimeout("Connecting to the source host timed out.")
            mig, mon = opening.value
            run.connections = None  # ours now: closed below
        else:
            mig = hv.connect(src_uri, call_timeout=settings.MIGRATION_TIMEOUT)
            mon = hv.connect(src_uri)
    except hv.HypervisorError as exc:
        raise Failed(f"Cannot reach the source host {job.source_name}: {exc}") from None
    op = None
    try:
        run.mark("migrate_start")
        op = Operation(lambda: mig.migrate(uuid, dst_uri, flags, params), f"migrate job {job.pk}")
        run.event(f"Migration started: {plan.virsh_command()}")  # while libvirt already works
        _monitor(run, mon, op)
        # The monitor also stops when the domain left the source; the call itself may
        # still be finishing (confirm phase): its result decides, so wait for it.
        op.wait(settings.LIBVIRT_CALL_TIMEOUT)
        run.mark("migrate_end")
    finally:
        mon.close()
        if op is None or op.done:
            mig.close()
    if op.error is not None:
        _explain_failure(run, op.error)
    elif not op.done:
        run.event(
            "The migrate call has not returned yet; concluding from where libvirt shows the VM.", "warn"
        )
        where = where_is(job)
        if where.get("target") in (None, "unreachable"):
            raise Failed(
                f"The migrate call did not return and the target does not report the VM; check {job.source_name}."
            )
    _conclude_success(run)


def _prepare_target_volumes(run):
    """Storage copy needs each disk's file to exist on the target, or an active pool
    whose target path is the disk's directory (libvirt then pre-creates the volume,
    lab pitfall 6). Check that now rather than let libvirt fail halfway."""
    job = run.job
    try:
        with hv.session(job.target.uri) as dst:
            for path in _disk_paths(job.vm):
                if dst.volume_at(path) is None and dst.pool_for_dir(os.path.dirname(path)) is None:
                    raise Failed(
                        f"{job.target_name} has no storage pool at {os.path.dirname(path)}, so the disk "
                        f"{path} cannot be created there. Define and start a directory pool at that "
                        f"path on {job.target_name}. The VM is still on {job.source_name}."
                    )
    except hv.HypervisorError as exc:
        raise Failed(f"Cannot prepare the target volumes on {job.target_name}: {exc}") from None
    run.event("Target volumes: an active pool at each disk's directory will hold the copies.")


def _monitor(run, mon, op=None):
    """Poll the source's job stats ~4×/s until the operation ends (``op``) or, when
    re-attaching without an operation, until libvirt says the job is over."""
    job = run.job
    uuid = str(job.vm.uuid)
    errors = 0
    started = time.monotonic()
    timeout = (job.options or {}).get("completion_timeout") or 0
    timeout_action = (job.options or {}).get("completion_action") or "abort"
    timed_out = False
    while True:
        if op is not None:
            if op.wait(POLL_SECONDS):
                return
        else:
            time.sleep(POLL_SECONDS)
        try:
            stats, state = mon.migration_snapshot(uuid)
            errors = 0
        except hv.DomainNotFound:
            return  # the domain left the source: the migration completed
        except hv.HypervisorError as exc:
            errors += 1
            if errors in (1, 20):
                log.warning("job %s: progress poll failed: %s", job.pk, exc)
            run.heartbeat()
            if mon._abandoned:
                try:
                    mon = hv.connect(job.source.uri)
                except hv.HypervisorError:
                    pass
            if op is None and errors > 40:
                raise Failed(f"Lost contact with {job.source_name} while re-attaching: {exc}") from None
            continue
        if op is None and stats["type"] in ("none", "completed", "failed", "cancelled"):
            return
        if stats["type"] in ("bounded", "unbounded"):
            fields = progress_from_stats(stats, state)
            if fields["phase"] == "memory":
                _judge_convergence(run, fields)
            run.progress(fields)
        else:
            run.heartbeat()
        row = run.controls()
        if row is None:
            return
        _apply_controls(run, mon, uuid, row)
        if timeout and not timed_out and time.monotonic() - started > timeout:
            timed_out = True
            if timeout_action == "postcopy" and (job.options or {}).get("postcopy"):
                run.event(f"Completion timeout ({timeout} s) reached: switching to post-copy.", "warn")
                _safe(run, "Switching to post-copy", lambda m=mon: m.start_postcopy(uuid))
            else:
                run.event(f"Completion timeout ({timeout} s) reached: aborting the migration.", "warn")
                run.applied["timeout_abort"] = True
                _safe(run, "Aborting", lambda m=mon: m.abort_job(uuid))


def _judge_convergence(run, fields):
    """Mark a sample "not converging" (no ETA) while the migration cannot finish, with a
    log line with the remedies when that starts and another when it ends."""
    downtime = run.applied.get("downtime") or run.job.max_downtime
    converging, d = run.convergence.judge(fields, downtime)
    if not converging:
        fields["phase"] = "not converging"
        fields["eta_seconds"] = None
    if converging == run.convergence.converging:
        return
    run.convergence.converging = converging
    if converging:
        write_event(run.job_id, ("converging_again", {}))
        return
    write_event(
        run.job_id,
        (
            "not_converging_stalled" if d["stalled"] else "not_converging",
            {
                "remaining": f"{d['remaining'] / MIB:.1f}",
                "rate": f"{d['rate'] / MIB:.1f}",
                "fits": f"{d['fits'] / MIB:.2f}",
                "downtime": d["downtime_ms"],
            },
        ),
        "warn",
    )


def _safe(run, what, fn):
    try:
        fn()
        return True
    except hv.HypervisorError as exc:
        run.event(f"{what} failed: {exc}", "error")
        return False


def _apply_controls(run, mon, uuid, row):
    if row["cancel_requested"] and not run.applied.get("cancel"):
        run.applied["cancel"] = True
        run.stop_copy.set()
        run.event("Aborting the migration (cancel).", "warn")
        _safe(run, "Aborting the migration", lambda: mon.abort_job(uuid))
    bw = row["requested_bandwidth"]
    if bw is not None and run.applied.get("bandwidth") != bw:
        run.applied["bandwidth"] = bw
        if _safe(run, "Changing the bandwidth", lambda: mon.set_max_speed(uuid, bw)):
            run.event(f"Bandwidth now {bw} MiB/s." if bw else "Bandwidth now unlimited.")
    ms = row["requested_downtime"]
    if ms is None:
        ms = (run.job.options or {}).get("max_downtime")  # a plan option, applied once the job runs
    if ms is not None and run.applied.get("downtime") != ms:
        run.applied["downtime"] = ms
        if _safe(run, "Changing the maximum downtime", lambda: mon.set_max_downtime(uuid, ms)):
            run.event(f"Maximum downtime now {ms} ms.")
    if row["postcopy_requested"] and not run.applied.get("postcopy"):
        run.applied["postcopy"] = True
        if _safe(run, "Switching to post-copy", lambda: mon.start_postcopy(uuid)):
            run.event("Switched to post-copy: the VM now runs on the target while memory follows.")


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


def _state_words(state):
    if state in (None, "unreachable"):
        return ""
    name, _reason = state
    return {"running": "running", "paused": "paused", "shutoff": "shut off"}.get(name, name)


def _explain_failure(run, error):
    """Turn a failed migrate call into Cancelled/Failed with where the VM is now."""
    job = run.job
    code = getattr(error, "code", None)
    raw = str(error)
    if code == hv.ERR_OPERATION_ABORTED and run.applied.get("timeout_abort"):
        raise Failed(
            f"The migration did not complete within the completion timeout and was aborted; "
            f"the VM is still running on {job.source_name}."
        )
    where = where_is(job)
    src, dst = where.get("source"), where.get("target")
    on_src = src not in (None, "unreachable")
    if dst not in (None, "unreachable") and _state_words(dst) == "running" and not on_src:
        # The call failed after the guest already switched over (e.g. in the finish
        # phase); libvirt's own answer about where it runs wins.
        run.event(f"The migrate call reported an error ({raw}) but the VM runs on the target.", "warn")
        return
    place = (
        f"the VM is still {_state_words(src)} on {job.source_name}"
        if on_src
        else f"the VM was not found on {job.source_name}"
    )
    if code == hv.ERR_OPERATION_ABORTED and run.applied.get("cancel"):
        raise Cancelled(f"Cancelled; {place}.")
    if dst == "unreachable":
        raise Failed(f"The target host's libvirtd went away during the migration; {place}.")
    if src == "unreachable":
        raise Failed(
            f"The source host {job.source_name} stopped answering during the migration ({raw}); "
            f"check it before retrying."
        )
    raise Failed(f"The migration failed: {raw.rstrip('.')}. {place[0].upper()}{place[1:]}.")


def _conclude_success(run, stats=None, extra=None):
    """Record success: final figures, the VM row moved to the target (location trail
    "migration") in the same pass that reads the completed-job statistics, the job row,
    the audit event; then the source's inventory (nothing there decides the outcome)."""
    job = run.job
    live = job.mode in (MigrationJob.LIVE, MigrationJob.LIVE_COPY)
    if stats is None:
        stats = {}
    records = None
    try:
        with hv.session(job.target.uri) as dst:
            if live and not stats:
                try:
                    stats = dst.job_stats(str(job.vm.uuid), completed=True)
                except hv.HypervisorError as exc:
                    run.event(f"Could not read the completed-job statistics: {exc}", "warn")
            records = dst.domains()
    except hv.HypervisorError as exc:
        run.event(f"Inventory sync of {job.target_name} failed: {exc}", "warn")
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
        result["link_mibs"] = _link_sample(job, stats)
    if job.mode == MigrationJob.LIVE_COPY:
        if (job.options or {}).get("remove_source_disks"):
            result["removed_source_disks"] = _remove_source_disks(run)
        else:
            # The source files stay, holding the data as of the move: recorded, so they
            # are never taken for shared storage and can be deleted from the VM page.
            record_left_copies(job, _disk_paths(job.vm))
    if records is not None:
        apply_inventory(Host.objects.get(pk=job.target_id), records, via="migration")
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
    _finish(run, MigrationJob.SUCCEEDED, "", **fields)
    summary = do_sync_inventory(Host.objects.get(pk=job.source_id))
    if summary.get("error"):
        run.event(f"Inventory sync of {job.source_name} failed: {summary['error']}", "warn")


def _link_sample(job, stats):
    """What this job says about the link between its hosts, in MiB/s (bytes moved / time),
    or None when it says nothing: a bandwidth cap (set at the start or on the way) or
    another migration sharing a host at the same time would understate the link, and
    one capped job must never make later preflights predict that nothing converges."""
    capped = (job.options or {}).get("bandwidth") or MigrationJob.objects.filter(
        pk=job.pk, requested_bandwidth__gt=0
    ).exists()
    data, elapsed = stats.get("data_processed") or 0, (stats.get("time_elapsed") or 0) / 1000
    if capped or not data or elapsed <= 0:
        return None
    hosts = [job.source_id, job.target_id]
    overlapping = (
        MigrationJob.objects.exclude(pk=job.pk)
        .filter(Q(source_id__in=hosts) | Q(target_id__in=hosts), started_at__lte=timezone.now())
        .filter(Q(finished_at__isnull=True) | Q(finished_at__gte=job.started_at))
        .exclude(status__in=[MigrationJob.PENDING_APPROVAL, MigrationJob.QUEUED, MigrationJob.REJECTED])
    )
    if overlapping.exists():
        return None
    return round(data / elapsed / MIB, 1)


def _remove_source_disks(run):
    """After a successful storage copy, and only when the user asked: delete the source
    copies libvirt leaves behind (lab pitfall 6)."""
    job = run.job
    removed = []
    try:
        with hv.session(job.source.uri) as src:
            for path in _disk_paths(job.vm):
                if src.volume_at(path) is not None:
                    src.delete_volume(path)
                    removed.append(path)
    except hv.HypervisorError as exc:
        run.event(f"Removing the source disks failed: {exc}", "error")
    if removed:
        run.event(f"Removed the source disks on {job.source_name}: {', '.join(removed)}.")
    return removed


def _hand_to_reconcile(run, why):
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


def _finish(run, status, error, **fields):
    """Conclude the job (first finisher wins) with its log line and audit event."""
    job = run.job
    now = timezone.now()
    held = tuple(s for s in states.WORKING + (states.NEEDS_RECONCILE,) if s in states.sources_of(status))
    level = {MigrationJob.SUCCEEDED: "info", MigrationJob.CANCELLED: "warn"}.get(status, "error")
    if status == MigrationJob.SUCCEEDED:
        figures = []
        if fields.get("downtime_ms") is not None:
            figures.append(f"downtime {fields['downtime_ms']} ms")
        if fields.get("elapsed_ms") is not None:
            figures.append(f"total {fields['elapsed_ms'] / 1000:.2f} s")
        moved = (fields.get("result") or {}).get("data_processed")
        if moved:
            figures.append(f"{moved / MIB:.1f} MiB moved")
        message = f"Succeeded: the VM is on {job.target_name}" + (
            f" ({', '.join(figures)})." if figures else "."
        )
    else:
        message = error
    done = transition(
        job.pk,
        status,
        from_=held,
        error=error,
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
    return status


# ---------------------------------------------------------------------- cold / offline
# Every step with a side effect goes through the job's journal (migrations_app/journal.py)
# so that settle() can finish or undo the move from any point, in this process after an
# error or in reconcile after the worker died.


def _disk_dirs(job):
    return sorted({os.path.dirname(p) for p in _disk_paths(job.vm)})


def prove_shared(job, src, dst):
    """{directory: True | False | None} for the VM's disks, by probe volume (see
    hypervisor.probe_shared): a file at the same path on the target proves nothing."""
    return src.probe_shared(dst, _disk_dirs(job))


def _run_offline(run, plan):
    """Definition only: OFFLINE + PERSIST_DEST + UNDEFINE_SOURCE of a shut-off VM."""
    job = run.job
    journal = Journal.load(job.pk)
    uuid = str(job.vm.uuid)
    try:
        with hv.session(job.source.uri, call_timeout=60) as src:
            journal.done("begin", was_running=False, start_on_target=False, mode="offline")
            run.event(("offline_move", {"virsh": plan.virsh_command()}))
            journal.started("migrate_definition")
            _blocking(
                run,
                lambda: src.migrate(uuid, job.target.uri, _offline_flags(plan), dict(plan.params())),
                "offline",
            )
            journal.done("migrate_definition")
    except (hv.HypervisorError, Failed, Cancelled) as exc:
        return settle(run, journal, exc)
    return settle(run, journal)


def _run_cold(run, plan):
    """Shut down (gracefully, with a timeout, optionally forced), move the definition
    (offline migration on proved shared storage, else volume copy + define), undefine the
    source, optionally start on the target, verify. Any failure, here or in a later
    reconcile, ends in settle()."""
    job = run.job
    uuid = str(job.vm.uuid)
    options = job.options or {}
    journal = Journal.load(job.pk)
    try:
        src = hv.connect(job.source.uri)
        dst = hv.connect(job.target.uri)
    except hv.HypervisorError as exc:
        raise Failed(
            f"Cannot reach a host: {exc}. Nothing was changed; the VM is on {job.source_name}."
        ) from None
    try:
        state = src.find_domain(uuid)
        if state is None:
            raise Failed(f"The VM is not on {job.source_name} any more. Nothing was changed.")
        was_running = state[0] != "shutoff"
        journal.done(
            "begin",
            was_running=was_running,
            start_on_target=bool(options.get("start_on_target", was_running)),
            mode="cold",
        )
        try:
            if was_running:
                _shutdown(run, journal, src, uuid, options)
            proof = prove_shared(job, src, dst)
            shared = bool(proof) and all(proof.values())
            journal.done("storage", shared=shared, proof=proof)
            if shared:
                run.event(("storage_shared", {}))
                journal.started("migrate_definition")
                flags = _offline_flags(plan)
                _blocking(
                    run, lambda: src.migrate(uuid, job.target.uri, flags, dict(plan.params())), "offline"
                )
                journal.done("migrate_definition")
            else:
                run.event(("storage_copy", {"target": job.target_name}))
                _copy_disks(run, journal, src, dst)
                xml = src.domain_xml(uuid, migratable=True, inactive=True)
                journal.started("define")
                dst.define(xml)
                journal.done("define")
                run.event(("defined", {"host": job.target_name}))
        except (Failed, Cancelled, hv.HypervisorError) as exc:
            return settle(run, journal, exc)
    finally:
        src.close()
        dst.close()
    return settle(run, journal)


def _blocking(run, fn, what):
    op = Operation(fn, f"{what} job {run.job_id}")
    while not op.wait(POLL_SECONDS):
        run.heartbeat()
    if op.error is not None:
        raise op.error
    return op.value


def _shutdown(run, journal, src, uuid, options):
    timeout = float(options.get("shutdown_timeout") or 60)
    force = bool(options.get("force_off"))
    run.update(phase="shutdown", eta_seconds=timeout)
    run.event(("shutdown_asked", {"timeout": f"{timeout:g}"}))
    journal.started("shutdown")
    try:
        src.shutdown(uuid)
    except hv.HypervisorError as exc:
        run.event(f"The shutdown request failed: {exc}", "warn")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = src.find_domain(uuid)
        if state is not None and state[0] == "shutoff":
            journal.done("shutdown")
            run.event(("shut_down", {}))
            return
        row = run.controls()
        if row and row["cancel_requested"]:
            raise Cancelled("Cancelled during the shutdown.")
        run.update(eta_seconds=round(max(0.0, deadline - time.monotonic()), 1))
        time.sleep(SHUTDOWN_POLL_SECONDS)
    if not force:
        raise Failed(f"The guest did not shut down within {timeout:g} s and forcing it off was not allowed.")
    run.event(("forcing_off", {"timeout": f"{timeout:g}"}), "warn")
    journal.started("force_off")
    src.destroy(uuid)
    journal.done("force_off")


def _copy_disks(run, journal, src, dst):
    """Copy each disk through libvirt volume streams, with its own progress. The empty
    target volume is created as a journaled step of its own, so a rollback removes
    exactly the volumes this job made."""
    job = run.job
    paths = _disk_paths(job.vm)
    sizes = {}
    for path in paths:
        vol = src.volume_at(path)
        if vol is None:
            raise Failed(
                f"The disk {path} is not in a storage pool on {job.source_name}, so it cannot be copied."
            )
        sizes[path] = vol["physical"]
    total = sum(sizes.values())
    state = {"done": 0}
    base = 0
    run.update(
        phase="disk copy", disk_total=total, data_total=total, disk_remaining=total, data_remaining=total
    )
    copy_started = time.monotonic()
    for path in paths:
        journal.started("create_volume", path=path)
        dst.call("Creating the copy volume", lambda _c, path=path: hv.create_copy_volume(src, dst, path))
        journal.done("create_volume", path=path)
        run.event(
            ("copying_disk", {"path": path, "mib": f"{sizes[path] / MIB:.1f}", "host": job.target_name})
        )

        def progress(done, _total, base=base):
            state["done"] = base + done

        journal.started("copy", path=path)
        op = Operation(
            lambda path=path, progress=progress: hv.copy_volume(
                src, dst, path, progress=progress, should_stop=run.stop_copy.is_set
            ),
            f"copy job {job.pk}",
        )
        while not op.wait(POLL_SECONDS):
            done = state["done"]
            rate = int(done / max(time.monotonic() - copy_started, 0.001))
            run.progress(
                {
                    "phase": "disk copy",
                    "percent": round(min(99.9, 100.0 * done / total), 1) if total else 0,
                    "disk_processed": done,
                    "disk_remaining": total - done,
                    "data_processed": done,
                    "data_remaining": total - done,
                    "rate": rate,
                    "eta_seconds": round((total - done) / rate, 1) if rate else None,
                }
            )
            row = run.controls()
            if row and row["cancel_requested"]:
                run.stop_copy.set()
        if op.error is not None:
            if run.stop_copy.is_set():
                raise Cancelled("Cancelled during the disk copy.")
            raise Failed(f"Copying the disk {path} failed: {op.error}.")
        journal.done("copy", path=path)
        base += sizes[path]
        state["done"] = base
    run.progress(
        {
            "phase": "disk copy",
            "percent": 99.9,
            "disk_processed": total,
            "disk_remaining": 0,
            "data_remaining": 0,
        }
    )


def settle(run, journal, cause=None):
    """Bring a cold or offline job to a safe end from its journal and libvirt's view.

    The definition went to the target (and the target has it): finish forward (undefine
    the source, remove or record the source disks, start on the target when asked,
    verify). It did not: roll back (remove the volumes this job created on the target,
    start the VM again on the source if it was running when the job began). ``cause`` is
    the error that stopped the run in this process (None: nothing went wrong, or called
    by reconcile after the worker died). Ends the job; returns its final status."""
    job = run.job
    uuid = str(job.vm.uuid)
    begin = journal.begin
    options = job.options or {}
    try:
        src = hv.connect(job.source.uri)
        dst = hv.connect(job.target.uri)
    except hv.HypervisorError as exc:
        raise Unsettled(f"Cannot reach a host to settle the job: {exc}") from None
    try:
        on_src, on_dst = src.find_domain(uuid), dst.find_domain(uuid)
        if journal.definition_sent and on_dst is not None:
            return _forward(run, journal, src, dst, on_src, on_dst, cause)
        return _roll_back(run, journal, src, dst, on_src, on_dst, cause, begin, options)
    except hv.HypervisorError as exc:
        raise Unsettled(f"Settling the job failed: {exc}") from None
    finally:
        src.close()
        dst.close()


class Unsettled(Exception):
    """settle() could not reach a host: the job stays for reconcile to try again."""


def _forward(run, journal, src, dst, on_src, on_dst, cause):
    job = run.job
    uuid = str(job.vm.uuid)
    begin = journal.begin
    options = job.options or {}
    if cause is not None:
        run.event(
            f"{_cause_words(cause)} The VM is already defined on {job.target_name}: finishing the move.",
            "warn",
        )
    if on_src is not None and options.get("undefine_source", True):
        if on_src[0] != "shutoff":
            return _finish(
                run,
                MigrationJob.FAILED,
                f"The VM is defined on {job.target_name} but {_state_words(on_src)} on {job.source_name}: "
                "check which copy is the real one before starting anything. Nothing else was changed.",
            )
        journal.started("undefine_source")
        src.undefine(uuid)
        journal.done("undefine_source")
        run.event(("undefined", {"host": job.source_name}))
    copied = [e["path"] for e in journal.find("copy")]
    if copied:
        if options.get("remove_source_disks"):
            if not journal.has("remove_source_disks"):
                journal.started("remove_source_disks")
                for path in copied:
                    if src.volume_at(path) is not None:
                        src.delete_volume(path)
                journal.done("remove_source_disks")
                run.event(("removed_disks", {"host": job.source_name, "paths": ", ".join(copied)}))
        else:
            record_left_copies(job, copied)
            for path in copied:
                run.event(("left_copy", {"path": path, "host": job.source_name}))
    want_running = bool(begin.get("start_on_target", options.get("start_on_target", False)))
    if want_running and on_dst[0] == "shutoff":
        journal.started("start")
        try:
            dst.start(uuid)
        except hv.HypervisorError as exc:
            return _finish(
                run,
                MigrationJob.FAILED,
                f"The VM was moved to {job.target_name}, but starting it there failed: {exc}. "
                f"It is defined and shut off on {job.target_name}, no longer on {job.source_name}.",
            )
        journal.done("start")
        run.event(("started", {"host": job.target_name}))
    _verify_moved(run, running=want_running)
    journal.done("verify")
    storage = "copied" if journal.has("create_volume", "started") else "shared"
    extra = {"was_running": bool(begin.get("was_running")), "storage": storage}
    if job.mode == MigrationJob.OFFLINE:
        extra = {}
    return _conclude_success(run, stats={}, extra=extra)


def _roll_back(run, journal, src, dst, on_src, on_dst, cause, begin, options):
    job = run.job
    uuid = str(job.vm.uuid)
    done = []
    if journal.entries:
        run.event(("rollback", {"step": journal.last_step or "-"}), "warn")
    for path in journal.created_volumes():
        if dst.volume_at(path) is not None:
            dst.delete_volume(path)
            done.append(f"removed the volume {path} it had created on {job.target_name}")
            run.event(("rolled_back_volume", {"path": path, "host": job.target_name}))
    if on_src is None:
        where = f"The VM is on neither {job.source_name} nor {job.target_name}."
    elif begin.get("was_running") and on_src[0] == "shutoff":
        try:
            src.start(uuid)
            done.append(f"started the VM again on {job.source_name}")
            run.event(("restarted_source", {"host": job.source_name}))
            where = f"The VM is running on {job.source_name}."
        except hv.HypervisorError as exc:
            where = (
                f"Starting it again on {job.source_name} failed: {exc}. It is shut off on {job.source_name}."
            )
    else:
        where = f"The VM is still {_state_words(src.find_domain(uuid))} on {job.source_name}."
    what = (
        _cause_words(cause)
        if cause is not None
        else (f"The worker stopped during the job (last step: {journal.last_step or 'none'}).")
    )
    undone = f" Rolled back: {'; '.join(done)}." if done else " Nothing had to be undone."
    if not journal.entries:
        undone = " The VM was not touched."
    status = (
        MigrationJob.CANCELLED
        if isinstance(cause, Cancelled) or _cancel_requested(run)
        else MigrationJob.FAILED
    )
    return _finish(run, status, f"{what}{undone} {where}")


def _cancel_requested(run):
    row = run.controls()
    return bool(row and row["cancel_requested"])


def _cause_words(cause):
    text = str(cause).strip()
    if isinstance(cause, hv.HypervisorError):
        text = f"The cold migration failed: {text}"
    return text if text.endswith(".") else f"{text}."


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


def _verify_moved(run, running):
    """After the move: the target has the VM (running when asked), the source does not."""
    job = run.job
    where = where_is(job)
    dst, src = where.get("target"), where.get("source")
    if dst in (None, "unreachable"):
        raise Failed(f"Verification failed: {job.target_name} does not report the VM after the move.")
    if running and dst[0] != "running":
        raise Failed(
            f"Verification failed: the VM is {_state_words(dst)} ({dst[1]}) on {job.target_name}, not running."
        )
    if src not in (None, "unreachable") and job.options.get("undefine_source", True):
        run.event(f"A definition of the VM is still on {job.source_name} ({_state_words(src)}).", "warn")
    run.event(f"Verified: the VM is {_state_words(dst)} on {job.target_name}.")

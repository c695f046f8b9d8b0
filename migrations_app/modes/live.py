"""Live: a running VM moves to a host that sees its disks, memory copied while it runs
(virsh migrate --live --p2p). PEER2PEER: the source libvirtd drives the migration, so it
survives a worker crash; reconcile re-attaches to it or concludes from where libvirt
shows the VM."""

import logging
import shlex
import time

from django.conf import settings
from django.db.models import Q
from django.utils.translation import gettext as _

from hosts import hypervisor as hv
from migrations_app.convergence import Action, Ladder
from migrations_app.jobrun import (
    MIB,
    Cancelled,
    Failed,
    Operation,
    conclude_success,
    finish,
    state_words,
    where_is,
)
from migrations_app.lifecycle import transition, write_event
from migrations_app.models import MigrationJob
from migrations_app.modes import Mode, register
from migrations_app.options import PlanError

log = logging.getLogger(__name__)


@register
class Live(Mode):
    """A running VM on shared storage: LIVE | PEER2PEER (+ PERSIST_DEST, UNDEFINE_SOURCE)."""

    key = "live"
    live = True

    def validate_state(self, vm_name, state, running, persistent):
        if not running:
            raise PlanError(
                _(
                    "Live migration needs a running VM, and %(vm)s is %(state)s. "
                    "Use Cold or Offline (definition only) for a VM that is not running."
                )
                % {"vm": vm_name, "state": state or _("in an unknown state")}
            )

    def storage_flags(self, options):
        """Extra flags for the disks (none: they are on shared storage)."""
        return []

    def storage_args(self, options):
        return []

    def flag_names(self, options):
        names = ["live", "peer2peer"]
        if options.get("tunnelled"):
            names.append("tunnelled")
        if options.get("persist", True):
            names.append("persist_dest")
        if options.get("undefine_source", True):
            names.append("undefine_source")
        names += self.storage_flags(options)
        for option, flag in (
            ("auto_converge", "auto_converge"),
            ("compression", "compressed"),
            ("parallel", "parallel"),
            ("postcopy", "postcopy"),
            ("tls", "tls"),
        ):
            if options.get(option):
                names.append(flag)
        return names

    def virsh_command(self, plan, src, dst, name):
        opts = plan.options
        parts = ["virsh", "-c", src, "migrate", "--live", "--p2p"]
        if opts.get("tunnelled"):
            parts.append("--tunnelled")
        if opts.get("tls"):
            parts.append("--tls")
        if opts.get("persist", True):
            parts.append("--persistent")
        if opts.get("undefine_source", True):
            parts.append("--undefinesource")
        parts += self.storage_args(opts)
        if opts.get("auto_converge"):
            parts.append("--auto-converge")
        if opts.get("compression"):
            parts.append("--compressed")
        if opts.get("parallel"):
            parts += ["--parallel", "--parallel-connections", str(opts["parallel"])]
        if opts.get("postcopy"):
            parts.append("--postcopy")
        if opts.get("bandwidth"):
            parts += ["--bandwidth", str(opts["bandwidth"])]
        if opts.get("completion_timeout") and opts.get("completion_action") == "postcopy":
            parts += ["--timeout", str(opts["completion_timeout"]), "--timeout-postcopy"]
        if opts.get("migrate_uri"):
            parts += ["--migrateuri", shlex.quote(opts["migrate_uri"])]
        parts += ["--verbose", name, dst]
        lines = [" ".join(parts)]
        if opts.get("max_downtime"):
            lines.append(
                f"# while it runs: virsh -c {src} migrate-setmaxdowntime {name} {opts['max_downtime']}"
            )
        if opts.get("completion_timeout") and opts.get("completion_action") == "abort":
            lines.append(
                f"# after {opts['completion_timeout']} s without completing: virsh -c {src} domjobabort {name}"
            )
        if opts.get("postcopy"):
            lines.append(f"# to switch to post-copy: virsh -c {src} migrate-postcopy {name}")
        lines += Ladder(opts, opts.get("max_downtime")).plan_lines(src, name)
        return "\n".join(lines)

    def before_migrate(self, run):
        """Checks right before the migrate call (storage copy: the target pools)."""

    def success_extra(self, run):
        """Extra result fields recorded with a success (storage copy: the source disks)."""
        return {}

    def conclude(self, run, stats=None):
        return conclude_success(run, stats, self.success_extra(run), live=True)

    def run(self, run, plan):
        return run_live(self, run, plan)

    def reconcile(self, run):
        """Still migrating on the source: re-attach and monitor; over: conclude from
        where libvirt shows the VM."""
        job = run.job
        where = where_is(job)
        if where.get("source_job") in ("bounded", "unbounded"):
            write_event(run.job_id, ("reattached", {}))
            try:
                mon = hv.connect(job.source.uri)
            except hv.HypervisorError:
                return release(run, ("retry_reattach", {}))
            try:
                monitor(run, mon, None)
            except Failed as exc:
                first = exc.parts[0]
                return release(run, (first["code"], first["params"]) if first["code"] else first["en"])
            finally:
                mon.close()
            where = where_is(job)
        return self._conclude_from(run, where)

    def _conclude_from(self, run, where):
        job = run.job
        src, dst = where.get("source"), where.get("target")
        if "unreachable" in (src, dst):
            side = job.source_name if src == "unreachable" else job.target_name
            return release(run, ("retry_where", {"host": side}))
        src_words, dst_words = state_words(src), state_words(dst)
        if dst is not None and dst[0] == "running" and (src is None or src[0] == "shutoff"):
            if src is not None:
                run.event(("definition_left", {"host": job.source_name, "state": state_words(src)}), "warn")
            run.event(("completed_per_libvirt", {"state": dst_words, "host": job.target_name}))
            self.conclude(run)
            return MigrationJob.SUCCEEDED
        if src is not None and dst is None:
            if job.cancel_requested:
                return finish(
                    run,
                    MigrationJob.CANCELLED,
                    [("err_cancelled_where", {"state": src_words, "host": job.source_name})],
                )
            return finish(
                run,
                MigrationJob.FAILED,
                [("err_live_not_completed", {"state": src_words, "host": job.source_name})],
            )
        if src is None and dst is None:
            return finish(
                run,
                MigrationJob.FAILED,
                [("err_where_neither", {"source": job.source_name, "target": job.target_name})],
            )
        both = {
            "src_state": src_words,
            "source": job.source_name,
            "dst_state": dst_words,
            "target": job.target_name,
        }
        return finish(run, MigrationJob.FAILED, [("err_live_both", both)])


def release(run, why):
    """Reconcile could not decide now: back to needs_reconcile for the next pass."""
    transition(
        run.job_id, MigrationJob.NEEDS_RECONCILE, from_=[MigrationJob.RUNNING], event=why, level="warn"
    )
    return "retry"


def run_live(mode, run, plan):
    job = run.job
    uuid = str(job.vm.uuid)
    src_uri, dst_uri = job.source.uri, job.target.uri
    flags = plan.flags()
    params = dict(plan.params())
    mode.before_migrate(run)
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
        raise Failed(("err_source_unreachable", {"host": job.source_name, "error": str(exc)})) from None
    op = watch = None
    try:
        run.mark("migrate_start")
        op = Operation(lambda: mig.migrate(uuid, dst_uri, flags, params), f"migrate job {job.pk}")
        if run.ahead_of_it is not None:
            run.ahead_of_it.next_moving()  # the batch child before concludes now (jobrun.py)
        run.event(("migration_started", {"virsh": plan.virsh_command()}))  # while libvirt already works
        watch = watch_passes(run, mon, uuid)
        monitor(run, mon, op)
        # The monitor also stops when the domain left the source; the call itself may
        # still be finishing (confirm phase): its result decides, so wait for it.
        op.wait(settings.LIBVIRT_CALL_TIMEOUT)
        run.mark("migrate_end")
    finally:
        if watch is not None:
            mon.unwatch(watch, timeout=WATCH_TIMEOUT_SECONDS)
        mon.close()
        if op is None or op.done:
            mig.close()
    if op.error is not None:
        explain_failure(run, op.error)
    elif not op.done:
        run.event(("migrate_not_returned", {}), "warn")
        where = where_is(job)
        if where.get("target") in (None, "unreachable"):
            raise Failed(("err_migrate_no_return", {"host": job.source_name}))
    mode.conclude(run)


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


# A chaining worker starts the next batch child's re-check (runner.Lookahead) once this
# job is about to land: its ETA is this short, or its second pass over memory began
# (watch_passes). The re-check then runs beside the migration's last moments, not
# between the two migrations (for a child bound to this job's target, free memory and
# names are looked at again once the VM has landed: runner.after_landing).
LOOKAHEAD_ETA_SECONDS = 1.0
WATCH_TIMEOUT_SECONDS = 3.0


def watch_passes(run, mon, uuid):
    """For a worker that chains batch children: start the next child's early re-check
    (runner.Lookahead.early) as this migration begins its second pass over memory
    (libvirt's migration-iteration event, on the monitor's connection). Returns the
    watch (mon.unwatch), or None.

    The ETA (bytes remaining / rate) says "about to land" too late or never for a guest
    whose memory is mostly untouched: QEMU sends the untouched pages as zero pages at no
    bandwidth at the end of the first pass: the ETA still read 3.0-3.2 s a quarter of a
    second before the landing, and the early re-check started before 3 of 20 traced
    hand-overs of benchmarks/evacuate.py. The second pass began 0.23 s before the call
    returned in each of six lab migrations (128 MiB, 32 MiB/s); the re-check takes
    30-60 ms. The event arrives on libvirt's event loop, which must not wait: the
    re-check starts from a thread of its own."""
    ahead = run.lookahead
    if ahead is None:
        return None
    target_id = run.job.target_id
    seen = []  # only the first pass after the first: a guest that never converges passes on and on

    def on_pass(iteration):
        if iteration < 2 or seen:
            return
        seen.append(iteration)
        if ahead.early():
            Operation(lambda: ahead.start_early(target_id), f"lookahead after {run.job_id}")

    try:
        # Bounded well under reconcile's stale limit: the monitor's first heartbeat waits.
        return mon.watch_migration_passes(uuid, on_pass, timeout=WATCH_TIMEOUT_SECONDS)
    except Exception as exc:  # best effort: the ETA still starts it (monitor)
        log.info("job %s: no migration-pass events: %s", run.job_id, exc)
        return None


def monitor(run, mon, op=None):
    """Poll the source's job stats (4×/s, less often with many jobs running at once:
    JobRun.poll_seconds) until the operation ends (``op``) or, when re-attaching without
    an operation, until libvirt says the job is over."""
    job = run.job
    uuid = str(job.vm.uuid)
    errors = 0
    started = time.monotonic()
    timeout = (job.options or {}).get("completion_timeout") or 0
    timeout_action = (job.options or {}).get("completion_action") or "abort"
    timed_out = False
    # Started from the downtime in effect: on a re-attach that is the row's, which the
    # ladder keeps up to date, so a restarted worker goes on from the step it reached.
    run.ladder = Ladder(job.options, job.max_downtime)
    while True:
        if op is not None:
            if op.wait(run.poll_seconds()):
                return
        else:
            time.sleep(run.poll_seconds())
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
                raise Failed(
                    ("err_lost_contact_reattach", {"host": job.source_name, "error": str(exc)})
                ) from None
            continue
        if op is None and stats["type"] in ("none", "completed", "failed", "cancelled"):
            return
        if stats["type"] in ("bounded", "unbounded"):
            fields = progress_from_stats(stats, state)
            mark = ""
            if fields["phase"] == "memory":
                judge_convergence(run, fields)
                mark = ladder_step(run, mon, uuid, fields)
            run.progress(fields, mark=mark, optional=not mark)
            eta = fields["eta_seconds"]
            ahead = run.lookahead
            if ahead is not None and eta is not None and eta <= LOOKAHEAD_ETA_SECONDS and ahead.early():
                ahead.start(before_landing=job.target_id)
        else:
            run.heartbeat()
        row = run.controls()
        if row is None:
            return
        apply_controls(run, mon, uuid, row)
        if timeout and not timed_out and time.monotonic() - started > timeout:
            timed_out = True
            if timeout_action == "postcopy" and (job.options or {}).get("postcopy"):
                run.event(("timeout_postcopy", {"timeout": timeout}), "warn")
                safe(run, "Switching to post-copy", lambda m=mon: m.start_postcopy(uuid))
            else:
                run.event(("timeout_abort", {"timeout": timeout}), "warn")
                run.applied["timeout_abort"] = True
                safe(run, "Aborting", lambda m=mon: m.abort_job(uuid))


def judge_convergence(run, fields):
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


def ladder_step(run, mon, uuid, fields):
    """Ask the job's convergence ladder what to do after this sample and do it; returns
    the chart mark of the step taken ("" when none)."""
    downtime = run.applied.get("downtime") or run.job.max_downtime
    action = run.ladder.decide(
        round(time.monotonic() - run.t0, 3), fields.get("iteration", 0), run.convergence.converging, downtime
    )
    if action is None:
        return ""
    if action.kind == "downtime":
        if not safe(run, "Raising the maximum downtime", lambda: mon.set_max_downtime(uuid, action.ms)):
            return ""
        # Recorded as the requested downtime: the page shows it, apply_controls sees
        # nothing new to apply, and reconcile's re-attach goes on from this step. Only
        # over the value the ladder itself saw: a downtime an operator asked for meanwhile
        # stays requested, and apply_controls applies it on the next loop (theirs wins).
        previous = run.applied.get("downtime")
        run.applied["downtime"] = action.ms
        unchanged = Q(requested_downtime__isnull=True) | Q(requested_downtime=previous)
        if MigrationJob.objects.filter(unchanged, pk=run.job_id).update(requested_downtime=action.ms):
            run.update()
        write_event(
            run.job_id,
            ("policy_downtime", {"ms": action.ms, "step": action.step, "steps": action.steps}),
            "warn",
        )
        return action.mark()
    if action.kind == "postcopy":
        write_event(run.job_id, ("policy_postcopy", {}), "warn")
        run.applied["postcopy"] = True
        if safe(run, "Switching to post-copy", lambda: mon.start_postcopy(uuid)):
            return action.mark()
        action = run.ladder.final = Action("abort")  # post-copy refused: the ladder ends in abort
    write_event(run.job_id, ("policy_abort", {}), "warn")
    run.applied["ladder_abort"] = True
    safe(run, "Aborting", lambda: mon.abort_job(uuid))
    return action.mark()


def safe(run, what, fn):
    try:
        fn()
        return True
    except hv.HypervisorError as exc:
        run.event(("control_failed", {"what": what, "error": str(exc)}), "error")
        return False


def apply_controls(run, mon, uuid, row):
    if row["cancel_requested"] and not run.applied.get("cancel"):
        run.applied["cancel"] = True
        run.stop_copy.set()
        run.event(("aborting", {}), "warn")
        safe(run, "Aborting the migration", lambda: mon.abort_job(uuid))
    bw = row["requested_bandwidth"]
    if bw is not None and run.applied.get("bandwidth") != bw:
        run.applied["bandwidth"] = bw
        if safe(run, "Changing the bandwidth", lambda: mon.set_max_speed(uuid, bw)):
            run.event(("bandwidth_now", {"mibs": bw}) if bw else ("bandwidth_unlimited", {}))
    ms = row["requested_downtime"]
    if ms is None:
        ms = (run.job.options or {}).get("max_downtime")  # a plan option, applied once the job runs
    if ms is not None and run.applied.get("downtime") != ms:
        run.applied["downtime"] = ms
        if safe(run, "Changing the maximum downtime", lambda: mon.set_max_downtime(uuid, ms)):
            run.event(("downtime_now", {"ms": ms}))
    if row["postcopy_requested"] and not run.applied.get("postcopy"):
        run.applied["postcopy"] = True
        if safe(run, "Switching to post-copy", lambda: mon.start_postcopy(uuid)):
            run.event(("postcopy_now", {}))


def explain_failure(run, error):
    """Turn a failed migrate call into Cancelled/Failed with where the VM is now."""
    job = run.job
    code = getattr(error, "code", None)
    raw = str(error)
    if code == hv.ERR_OPERATION_ABORTED and run.applied.get("timeout_abort"):
        raise Failed(("err_timeout_aborted", {"host": job.source_name}))
    where = where_is(job)
    src, dst = where.get("source"), where.get("target")
    on_src = src not in (None, "unreachable")
    if dst not in (None, "unreachable") and state_words(dst) == "running" and not on_src:
        # The call failed after the guest already switched over (e.g. in the finish
        # phase); libvirt's own answer about where it runs wins.
        run.event(("error_but_moved", {"error": raw}), "warn")
        return
    # Where the VM is, as the end of a sentence and as a sentence of its own.
    at = {"state": state_words(src), "host": job.source_name} if on_src else {"host": job.source_name}
    place = {"code": "err_place_still" if on_src else "err_place_not_found", "params": at}
    where = ("err_where_still" if on_src else "err_where_not_found", at)
    if code == hv.ERR_OPERATION_ABORTED and run.applied.get("ladder_abort") and not run.applied.get("cancel"):
        ms = run.applied.get("downtime") or job.max_downtime
        raise Failed(("err_policy_aborted", {"ms": ms, "place": place}))
    if run.applied.get("cancel") and (code == hv.ERR_OPERATION_ABORTED or (on_src and dst is None)):
        # A cancel that lands before QEMU's migration runs (libvirt still setting it up)
        # does not always come back as "operation aborted": QEMU may refuse the half-set-up
        # migration ("Invalid argument"). The user asked to stop, and libvirt says the VM
        # is still on the source and not on the target: that is a cancel, with libvirt's
        # own words in the log.
        if code != hv.ERR_OPERATION_ABORTED:
            run.event(("cancel_ended_with", {"error": raw}), "warn")
        raise Cancelled(("err_cancelled_place", {"place": place}))
    if dst == "unreachable":
        raise Failed(("err_target_gone", {"place": place}))
    if src == "unreachable":
        raise Failed(("err_source_stopped", {"host": job.source_name, "error": raw}))
    raise Failed([("err_migration_failed", {"error": raw.rstrip(".")}), where])

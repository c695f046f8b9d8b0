"""Cold: shut the VM down (gracefully, with a timeout, optionally forced), move the
definition (offline migration when the disks are on proved shared storage, else copy the
volumes through libvirt streams and define it on the target), optionally start it there.

Every step with a side effect goes through the job's journal (migrations_app/journal.py)
so that settle() can finish or undo the move from any point: in this process after an
error, or in reconcile after the worker died.
"""

import os
import shlex
import time
from datetime import timedelta

from django.utils import timezone
from django.utils.translation import gettext as _

from hosts import hypervisor as hv
from migrations_app.jobrun import (
    MIB,
    Cancelled,
    Failed,
    Operation,
    Unsettled,
    blocking,
    conclude_success,
    disk_paths,
    finish,
    record_left_copies,
    state_words,
    verify_moved,
)
from migrations_app.journal import Journal
from migrations_app.lifecycle import transition
from migrations_app.models import MigrationJob
from migrations_app.modes import Mode, register
from migrations_app.options import PlanError

SHUTDOWN_POLL_SECONDS = 0.25


def offline_flags(plan):
    """The definition move always goes PEER2PEER: migrateToURI3 has no client-driven
    ("direct") variant ("direct migration is not supported by the source host")."""
    return plan.flags() | hv.MIGRATE_FLAGS["peer2peer"]


def definition_flags(options):
    names = ["offline", "persist_dest"]
    if options.get("undefine_source", True):
        names.append("undefine_source")
    return names


def definition_command(src, dst, name, options):
    parts = ["virsh", "-c", src, "migrate", "--offline", "--persistent"]
    if options.get("undefine_source", True):
        parts.append("--undefinesource")
    return " ".join(parts + [name, dst])


@register
class Cold(Mode):
    """Any VM, downtime accepted: shutdown, then OFFLINE | PERSIST_DEST | UNDEFINE_SOURCE
    on shared storage, or a volume copy and a define on the target."""

    key = "cold"
    copies_disks = True
    shuts_down = True

    def runs_on_target(self, options):
        return bool(options.get("start_on_target", True))

    def validate_state(self, vm_name, state, running, persistent):
        if not persistent:
            raise PlanError(
                _("A transient VM disappears when it shuts down, so it cannot be migrated cold. Use Live.")
            )

    def flag_names(self, options):
        return definition_flags(options)

    def virsh_command(self, plan, src, dst, name):
        opts = plan.options
        timeout = opts.get("shutdown_timeout", 120)
        lines = [
            f"virsh -c {src} shutdown {name}",
            f"# wait up to {timeout} s until `virsh -c {src} domstate {name}` says shut off"
            + (f", else: virsh -c {src} destroy {name}" if opts.get("force_off") else ", else give up"),
        ]
        for disk in getattr(plan.vm, "disks", None) or []:
            path = disk.get("source") if isinstance(disk, dict) else ""
            if path and disk.get("device", "disk") == "disk":
                qp = shlex.quote(path)
                lines.append(
                    f"# disk not on shared storage only: virsh -c {src} vol-download {qp} /tmp/disk.img && "
                    f"virsh -c {dst} vol-upload {qp} /tmp/disk.img  (after vol-create on the target)"
                )
        lines.append(definition_command(src, dst, name, opts))
        if opts.get("start_on_target", True):
            lines.append(f"virsh -c {dst} start {name}")
        return "\n".join(lines)

    def run(self, run, plan):
        return run_cold(run, plan)

    def reconcile(self, run):
        return reconcile_from_journal(run)


def reconcile_from_journal(run):
    """Finish forward or roll back a cold/offline job whose worker stopped."""
    try:
        return settle(run, Journal.load(run.job_id))
    except Unsettled as exc:
        transition(
            run.job_id,
            MigrationJob.NEEDS_RECONCILE,
            from_=[MigrationJob.RUNNING],
            event=f"{exc}; will retry.",
            level="warn",
        )
        return "retry"
    except Failed as exc:
        return finish(run, MigrationJob.FAILED, exc.parts)


def disk_dirs(job):
    return sorted({os.path.dirname(p) for p in disk_paths(job.vm)})


def prove_shared(job, src, dst):
    """{directory: True | False | None} for the VM's disks, by probe volume (see
    hypervisor.probe_shared): a file at the same path on the target proves nothing."""
    return src.probe_shared(dst, disk_dirs(job))


def run_cold(run, plan):
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
        raise Failed(("err_cold_unreachable", {"error": str(exc), "host": job.source_name})) from None
    try:
        state = src.find_domain(uuid)
        if state is None:
            raise Failed(("err_not_on_source", {"host": job.source_name}))
        was_running = state[0] != "shutoff"
        journal.done(
            "begin",
            was_running=was_running,
            start_on_target=bool(options.get("start_on_target", was_running)),
            mode="cold",
        )
        try:
            if was_running:
                shutdown(run, journal, src, uuid, options)
            proof = prove_shared(job, src, dst)
            shared = bool(proof) and all(proof.values())
            journal.done("storage", shared=shared, proof=proof)
            if shared:
                run.event(("storage_shared", {}))
                journal.started("migrate_definition")
                flags = offline_flags(plan)
                blocking(
                    run, lambda: src.migrate(uuid, job.target.uri, flags, dict(plan.params())), "offline"
                )
                journal.done("migrate_definition")
            else:
                run.event(("storage_copy", {"target": job.target_name}))
                copy_disks(run, journal, src, dst)
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


def shutdown(run, journal, src, uuid, options):
    """Ask the guest to shut down and wait until libvirt says shut off, at most the
    timeout. The deadline is stored on the row (every watcher counts down to the same
    instant). "Force off now" (services.do_force_off_now) ends the wait at the next poll;
    the timeout forces off only when the job's force_off option allows it. Forcing off is
    the journaled ``force_off`` step either way."""
    timeout = float(options.get("shutdown_timeout") or 60)
    force = bool(options.get("force_off"))
    deadline_at = timezone.now() + timedelta(seconds=timeout)
    run.update(phase="shutdown", eta_seconds=timeout, shutdown_deadline=deadline_at)
    run.event(("shutdown_asked", {"timeout": f"{timeout:g}"}))
    journal.started("shutdown")
    try:
        src.shutdown(uuid)
    except hv.HypervisorError as exc:
        run.event(("shutdown_request_failed", {"error": str(exc)}), "warn")
    deadline = time.monotonic() + timeout
    asked_by = None
    while time.monotonic() < deadline:
        state = src.find_domain(uuid)
        if state is not None and state[0] == "shutoff":
            journal.done("shutdown")
            run.event(("shut_down", {}))
            # Out of the shutdown phase: no countdown, no "Force off now" any more.
            run.update(phase="moving", eta_seconds=None, shutdown_deadline=None)
            return
        row = run.controls()
        if row and row["cancel_requested"]:
            raise Cancelled(("err_cancelled_shutdown", {}))
        if row and row.get("force_off_requested"):
            asked_by = row.get("force_off_requested_by") or "-"
            break
        run.update(eta_seconds=round(max(0.0, deadline - time.monotonic()), 1))
        time.sleep(SHUTDOWN_POLL_SECONDS)
    if asked_by is not None:
        run.event(("forced_off_now", {"user": asked_by}), "warn")
    elif not force:
        raise Failed(("err_shutdown_timeout", {"timeout": f"{timeout:g}"}))
    else:
        run.event(("forcing_off", {"timeout": f"{timeout:g}"}), "warn")
    journal.started("force_off", asked_by=asked_by or "")
    try:
        src.destroy(uuid)
    except hv.HypervisorError:
        # The guest may have finished shutting down since the last poll ("domain is not
        # running"): that is the state we wanted, not a failure to roll back.
        state = src.find_domain(uuid)
        if state is None or state[0] != "shutoff":
            raise
    journal.done("force_off")
    run.update(phase="moving", eta_seconds=None, shutdown_deadline=None)


def copy_disks(run, journal, src, dst):
    """Copy each disk through libvirt volume streams, with its own progress. The empty
    target volume is created as a journaled step of its own, so a rollback removes
    exactly the volumes this job made."""
    job = run.job
    paths = disk_paths(job.vm)
    sizes = {}
    for path in paths:
        vol = src.volume_at(path)
        if vol is None:
            raise Failed(("err_not_in_pool", {"path": path, "host": job.source_name}))
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
        # Sampled as the live mode samples (JobRun.poll_seconds: less often the more jobs
        # run at once), each sample optional: with many copies at once a claim or a
        # conclusion waits behind fewer progress writes.
        while not op.wait(run.poll_seconds()):
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
                },
                optional=True,
            )
            row = run.controls()
            if row and row["cancel_requested"]:
                run.stop_copy.set()
        if op.error is not None:
            if run.stop_copy.is_set():
                raise Cancelled(("err_cancelled_copy", {}))
            raise Failed(("err_copy_failed", {"path": path, "error": str(op.error)}))
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
            return forward(run, journal, src, dst, on_src, on_dst, cause)
        return roll_back(run, journal, src, dst, on_src, on_dst, cause, begin, options)
    except hv.HypervisorError as exc:
        raise Unsettled(f"Settling the job failed: {exc}") from None
    finally:
        src.close()
        dst.close()


def forward(run, journal, src, dst, on_src, on_dst, cause):
    job = run.job
    uuid = str(job.vm.uuid)
    begin = journal.begin
    options = job.options or {}
    if cause is not None:
        run.event(
            f"{cause_words(cause)} The VM is already defined on {job.target_name}: finishing the move.",
            "warn",
        )
    if on_src is not None and options.get("undefine_source", True):
        if on_src[0] != "shutoff":
            return finish(
                run,
                MigrationJob.FAILED,
                [
                    (
                        "err_defined_both",
                        {"target": job.target_name, "state": state_words(on_src), "source": job.source_name},
                    )
                ],
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
            return finish(
                run,
                MigrationJob.FAILED,
                [
                    (
                        "err_start_on_target_failed",
                        {"target": job.target_name, "error": str(exc), "source": job.source_name},
                    )
                ],
            )
        journal.done("start")
        run.event(("started", {"host": job.target_name}))
    verify_moved(run, running=want_running)
    journal.done("verify")
    storage = "copied" if journal.has("create_volume", "started") else "shared"
    extra = {"was_running": bool(begin.get("was_running")), "storage": storage}
    if job.mode == MigrationJob.OFFLINE:
        extra = {}
    return conclude_success(run, stats={}, extra=extra)


def roll_back(run, journal, src, dst, on_src, on_dst, cause, begin, options):
    job = run.job
    uuid = str(job.vm.uuid)
    done = []  # sentences (code, params) of what was undone, shown in each viewer's language
    if journal.entries:
        run.event(("rollback", {"step": journal.last_step or "-"}), "warn")
    for path in journal.created_volumes():
        if dst.volume_at(path) is not None:
            dst.delete_volume(path)
            done.append(("rolled_back_volume", {"path": path, "host": job.target_name}))
            run.event(done[-1])
    if on_src is None:
        where = ("err_where_neither", {"source": job.source_name, "target": job.target_name})
    elif begin.get("was_running") and on_src[0] == "shutoff":
        try:
            src.start(uuid)
            done.append(("restarted_source", {"host": job.source_name}))
            run.event(done[-1])
            where = ("err_where_running", {"host": job.source_name})
        except hv.HypervisorError as exc:
            where = ("err_where_start_failed", {"host": job.source_name, "error": str(exc)})
    else:
        where = ("err_where_still", {"state": state_words(src.find_domain(uuid)), "host": job.source_name})
    what = (
        cause_parts(cause)
        if cause is not None
        else [("err_worker_stopped", {"step": journal.last_step or "none"})]
    )
    undone = [("err_rolled_back", {}), *done] if done else [("err_nothing_undone", {})]
    if not journal.entries:
        undone = [("err_untouched", {})]
    status = (
        MigrationJob.CANCELLED
        if isinstance(cause, Cancelled) or cancel_requested(run)
        else MigrationJob.FAILED
    )
    return finish(run, status, [*what, *undone, where])


def cancel_requested(run):
    row = run.controls()
    return bool(row and row["cancel_requested"])


def cause_parts(cause):
    """The error sentences of what stopped the run (coded when the cause is)."""
    if isinstance(cause, hv.HypervisorError):
        return [("err_cold_failed", {"error": str(cause).strip().rstrip(".")})]
    if getattr(cause, "parts", None) and cause.parts[0]["code"]:
        return list(cause.parts)
    return [cause_words(cause)]


def cause_words(cause):
    text = str(cause).strip()
    if isinstance(cause, hv.HypervisorError):
        text = f"The cold migration failed: {text}"
    return text if text.endswith(".") else f"{text}."

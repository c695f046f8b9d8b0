"""State changes of migration jobs: request, approve/reject, cancel and the live controls.

Each ``do_*`` writes its audit event inside the same transaction as the change. libvirt is
never called inside a transaction (preflight runs before the transaction opens). The
worker picks control requests up from the job row (see runner.py); these functions only
record what was asked, so they answer at once even while a host is slow.
"""

import contextvars
import logging
import time
from contextlib import contextmanager

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext as _

from hosts import hypervisor as hv
from hosts.services import refresh_vm_state
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.audit import record, record_refusal
from kvmweb.audit.models import AuditEvent
from migrations_app import events, states, windows
from migrations_app.lifecycle import transition, write_event
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.options import MODE_KEYS, OptionError, clean_control
from migrations_app.policy import check_request
from migrations_app.streaming import publish_job

log = logging.getLogger(__name__)


class JobError(Exception):
    """A job request or control was refused; the message is meant for people.
    ``active_job`` is set when the refusal is "this VM already has an active job"."""

    def __init__(self, message, *, active_job=None, report=None):
        super().__init__(message)
        self.active_job = active_job
        self.report = report


def _policy_check(user, vm, target, mode, options):
    """The self-service policy's decision (migrations_app/policy.py)."""
    return check_request(user, vm, target, mode, options)


def add_event(job_id, message, level="info"):
    """Append a line (text, or a (code, params) pair) to the job's event log."""
    write_event(job_id, message, level)


def _audit_job(action, job, *, actor=None, request=None, outcome=AuditEvent.SUCCESS, details=None):
    base = {
        "job": job.pk,
        "vm": job.vm_name,
        "source": job.source_name,
        "target": job.target_name,
        "mode": job.mode,
    }
    base.update(details or {})
    return record(
        action,
        actor=actor,
        request=request,
        target=job,
        outcome=outcome,
        details=base,
    )


_held_messages = contextvars.ContextVar("kvmweb_held_messages", default=None)


@contextmanager
def messages_held():
    """Inside this block ``enqueue`` records the jobs instead of queueing them; yields
    that list. ``migrate_vm --wait`` runs its job in its own process: a message sent
    before the command's own claim had an idle worker win the job about one time in
    three on a loaded machine (the command then waited for the queue pickup and a second
    checklist). The command sends the held messages itself when it does not run the job;
    killed before its claim, the job is queued again by the lost-message watch
    (tasks.watch_lost) within seconds."""
    token = _held_messages.set([])
    try:
        yield _held_messages.get()
    finally:
        _held_messages.reset(token)


def enqueue(job):
    """Queue the job's task on the dedicated "migrations" cluster once the surrounding
    transaction commits (a worker must never see a job id whose row is not there yet).
    The message carries only the id; the worker's conditional claim makes a redelivered
    or duplicated message harmless. Inside ``messages_held`` only recorded."""
    held = _held_messages.get()
    if held is not None:
        held.append(job)
        return
    job_id = job.pk

    def push():
        from django_q.tasks import async_task

        async_task(
            "migrations_app.tasks.run_migration",
            job_id,
            cluster="migrations",
            task_name=f"migration-{job_id}",
            group="migrations",
        )

    transaction.on_commit(push)


def check_can_request(user, vm, target, mode, options):
    """Raise JobError unless ``user`` may ask for this migration. Returns the policy
    decision (or None when no policy module exists)."""
    if not user.has_perm("migrations_app.add_migrationjob"):
        raise JobError(_("Your role does not allow starting migrations."))
    decision = _policy_check(user, vm, target, mode, options)
    if decision is not None and not decision.allowed:
        raise JobError(decision.reason or _("This migration is not allowed."))
    return decision


def check_can_request_quietly(user, vm, target, mode, options):
    """The policy's decision for showing it (the wizard's confirm button says "Send for
    approval" when the request will wait); None when refused or no policy applies.
    Not audited: nothing is requested yet."""
    try:
        return check_can_request(user, vm, target, mode, options)
    except JobError:
        return None


def check_overrides(user, report, overridden):
    """Only users with override_preflight may override a failed check, and only checks
    the report marks overridable."""
    if not overridden:
        return
    if not user.has_perm("migrations_app.override_preflight"):
        raise JobError(_("Only an administrator may override a failed preflight check."))


def do_create_job(
    vm,
    target,
    mode,
    options=None,
    *,
    actor,
    request=None,
    report=None,
    acknowledged=(),
    overridden=(),
    reason="",
    not_before=None,
    not_after=None,
    ignore_blackouts=False,
    recheck=False,
):
    """Create the migration job for ``vm`` to ``target`` and queue it (or park it for
    approval when the requester's policy says so).

    ``not_before``/``not_after``: the job's window (migrations_app/windows.py); a job
    whose window opens later is held, not queued, until it does. A blackout of the source's
    or target's host group refuses a job that would start now, unless an administrator
    sets ``ignore_blackouts`` (audited with the request).

    Runs the preflight (unless ``report`` is given) before the transaction; refuses with
    JobError when a check blocks (fail not overridden, warning not acknowledged).
    ``recheck``: ``report`` is the checklist the user read, perhaps minutes ago; what can
    change is checked again now (runner.recheck, what a worker's claim would run) and a
    fail not overridden refuses here, on the page that asked, instead of failing the job.
    A checklist run here is stored with the time it began (``at_request``): the worker
    takes it as its own re-check when it claims the job within seconds of it
    (runner.request_check); a job that waits for its window or an approval is not
    re-checked here (the worker checks it when it starts). The
    database's one-active-job-per-VM constraint makes double clicks and two browsers
    submitting at once create exactly one job: the loser gets JobError with active_job.
    """
    from migrations_app.plan import MigrationPlan, PlanError
    from migrations_app.preflight import run_preflight

    source = vm.host
    acknowledged, overridden = list(acknowledged or []), list(overridden or [])
    if "start_on_target" in MODE_KEYS.get(mode, ()) and "start_on_target" not in (options or {}):
        # "Start on the target" defaults to whether the VM runs now (libvirt, not the
        # last inventory sync): a VM started outside kvmweb must not be moved and left off.
        refresh_vm_state(vm)
    try:
        plan = MigrationPlan(vm, source, target, mode, dict(options or {}))
        plan.validate()
        options = plan.options  # normalized (defaults filled in, other modes' keys dropped)
    except PlanError as exc:
        raise JobError(str(exc)) from None
    try:
        not_before, not_after = windows.clean_window(not_before, not_after)
    except windows.WindowError as exc:
        raise JobError(str(exc)) from None
    window = {
        "not_before": not_before.isoformat() if not_before else None,
        "not_after": not_after.isoformat() if not_after else None,
        "ignore_blackouts": bool(ignore_blackouts),
    }
    try:
        decision = check_can_request(actor, vm, target, mode, options)
        check_overrides(actor, report, overridden)
        if ignore_blackouts and not actor.has_perm("migrations_app.override_preflight"):
            raise JobError(_("Only an administrator may start a migration inside a blackout window."))
    except JobError as exc:
        with transaction.atomic():
            record(
                "migration.request",
                actor=actor,
                request=request,
                target=vm,
                outcome=AuditEvent.DENIED,
                details={"target": getattr(target, "name", ""), "mode": mode, "error": str(exc)},
            )
        raise
    active = MigrationJob.objects.active().filter(vm=vm).first()
    if active is not None:
        raise JobError(
            _("%(vm)s already has an active migration (job #%(job)d).") % {"vm": vm.name, "job": active.pk},
            active_job=active,
        )
    now = timezone.now()
    held = bool(not_before and not_before > now)
    blackout = "" if ignore_blackouts or held else windows.blocker(source, target, now)
    if blackout:
        message = _(
            "%(why)s Nothing starts inside a blackout window: schedule the migration after it "
            "(not before), or ask an administrator to override the blackout."
        ) % {"why": blackout}
        with transaction.atomic():
            record(
                "migration.request",
                actor=actor,
                request=request,
                target=vm,
                outcome=AuditEvent.DENIED,
                details={"target": target.name, "mode": mode, "error": message, **window},
            )
        raise JobError(message)
    # When the checklist run here began: what it read is at most that old (the worker
    # counts from it, runner.request_check).
    at_request = None
    if report is None:
        at_request = time.time()
        report = run_preflight(plan)  # libvirt: outside any transaction
    blocking = report.blocking_reasons(acknowledged, overridden)
    needs_approval = bool(decision is not None and decision.needs_approval)
    # Only for a job that starts now: one that waits for its window or an approval is
    # checked by the worker when it starts, and must not be refused for a host that is
    # briefly away now.
    if recheck and at_request is None and not blocking and not held and not needs_approval:
        from migrations_app.runner import recheck as check_again

        at_request = time.time()
        report = check_again(plan, report.to_dict())
        # As the worker's re-check: fails block; a new warning is logged on the job.
        blocking = report.blocking_reasons([r.id for r in report.warnings], overridden)
    if blocking:
        with transaction.atomic():
            record(
                "migration.request",
                actor=actor,
                request=request,
                target=vm,
                outcome=AuditEvent.FAILURE,
                details={"target": target.name, "mode": mode, "blocking": list(blocking)},
            )
        raise JobError(
            _("The preflight checklist blocks this migration: %(why)s") % {"why": "; ".join(blocking)},
            report=report,
        )
    status = MigrationJob.PENDING_APPROVAL if needs_approval else MigrationJob.QUEUED
    checklist = report.to_dict()
    if at_request is not None:
        checklist["at_request"] = at_request
    try:
        with transaction.atomic():
            job = MigrationJob.objects.create(
                vm=vm,
                vm_name=vm.name,
                source=source,
                source_name=source.name if source else "",
                target=target,
                target_name=target.name,
                mode=mode,
                options=options,
                status=status,
                requested_by=actor,
                requested_by_name=actor.get_username() if actor else "",
                reason=reason,
                preflight=checklist,
                acknowledged=acknowledged,
                overridden=overridden,
                not_before=not_before,
                not_after=not_after,
                ignore_blackouts=bool(ignore_blackouts),
                waiting_for=(_("Scheduled: starts at %(t)s.") % {"t": windows.fmt(not_before)})
                if held
                else "",
            )
            JobEvent.objects.create(
                job=job,
                message=(
                    _("Requested by %(user)s; waiting for approval.")
                    if needs_approval
                    else _("Requested by %(user)s; queued.")
                )
                % {"user": job.requested_by_name or "-"},
            )
            _audit_job(
                "migration.request",
                job,
                actor=actor,
                request=request,
                details={
                    "options": options,
                    "virsh": plan.virsh_command(),
                    "status": status,
                    "acknowledged": acknowledged,
                    "overridden": overridden,
                    "preflight": checklist,
                    **window,
                },
            )
            if held:
                write_event(job.pk, ("waiting", {"reason": job.waiting_for}))
            elif not needs_approval:
                enqueue(job)
    except IntegrityError:
        # Lost the race against a concurrent request for the same VM: the conditional
        # unique constraint let exactly one of us in.
        active = MigrationJob.objects.active().filter(vm=vm).first()
        raise JobError(
            _("%(vm)s already has an active migration (job #%(job)s).")
            % {"vm": vm.name, "job": active.pk if active else "?"},
            active_job=active,
        ) from None
    publish_job(job.pk)
    return job


def do_approve_job(job, actor, request=None):
    """PENDING_APPROVAL -> QUEUED (and enqueue). Refuses if someone else decided first."""
    with transaction.atomic():
        moved = transition(
            job.pk,
            MigrationJob.QUEUED,
            from_=[MigrationJob.PENDING_APPROVAL],
            approved_by=actor,
            event=_("Approved by %(user)s.") % {"user": actor.get_username()},
            audit="migration.approve",
            actor=actor,
            request=request,
        )
        if not moved:
            raise JobError(_("This request is no longer waiting for approval."))
        job.refresh_from_db()
        enqueue(job)
    return job


def do_reject_job(job, actor, reason="", request=None):
    """PENDING_APPROVAL -> REJECTED with the reason shown to the requester."""
    moved = transition(
        job.pk,
        MigrationJob.REJECTED,
        from_=[MigrationJob.PENDING_APPROVAL],
        approved_by=actor,
        reason=reason,
        event=_("Rejected by %(user)s: %(reason)s") % {"user": actor.get_username(), "reason": reason},
        level="warn",
        audit="migration.reject",
        actor=actor,
        request=request,
        outcome=AuditEvent.SUCCESS,
        details={"reason": reason},
    )
    if not moved:
        raise JobError(_("This request is no longer waiting for approval."))
    job.refresh_from_db()
    return job


def do_cancel_job(job, actor, request=None):
    """Cancel a job. Not started yet (waiting or queued): cancelled at once. Running: the
    worker sees cancel_requested within a poll (~0.25 s) and aborts the libvirt job; the
    VM stays on the source. A refusal is audited as a failure (outside the rolled-back
    transaction, so the failure event survives)."""
    try:
        return _cancel(job, actor, request)
    except _Refused:
        job.refresh_from_db()
        with transaction.atomic():
            record(
                "migration.cancel",
                actor=actor,
                request=request,
                target=job,
                outcome=AuditEvent.FAILURE,
                details={"job": job.pk, "status": job.status, "error": "not cancellable"},
            )
        raise JobError(
            _("Job #%(job)d cannot be cancelled: it is %(status)s.")
            % {"job": job.pk, "status": job.get_status_display()}
        ) from None


class _Refused(Exception):
    """Internal: the conditional update matched no row (state changed meanwhile)."""


def _cancel(job, actor, request):
    """Not started yet: cancelled at once. Held by a worker: CANCELLING, which the worker
    (or reconcile) turns into the final state once it knows where the VM is."""
    line = _("Cancel requested by %(user)s.") % {"user": actor.get_username()}
    common = {"event": line, "level": "warn", "audit": "migration.cancel", "actor": actor, "request": request}
    with transaction.atomic():
        moved = transition(
            job.pk,
            MigrationJob.CANCELLED,
            from_=states.CANCEL_AT_ONCE,
            cancel_requested=True,
            # Stored in English with its code: each viewer reads it in their language.
            error=events.english(events.parts(("err_cancelled_before_start", {}))),
            error_parts=events.parts(("err_cancelled_before_start", {})),
            outcome=AuditEvent.SUCCESS,
            **common,
        ) or transition(
            job.pk,
            MigrationJob.CANCELLING,
            from_=states.CANCEL_THROUGH_WORKER,
            cancel_requested=True,
            **common,
        )
        if not moved:
            raise _Refused
    job.refresh_from_db()
    return job


def _control(job, actor, request, action, fields, message, details):
    """Record a control request for the worker (only while the migration runs)."""
    with transaction.atomic():
        changed = MigrationJob.objects.filter(pk=job.pk, status=MigrationJob.RUNNING).update(
            **fields, progress_seq=F("progress_seq") + 1
        )
        if changed:
            job.refresh_from_db()
            JobEvent.objects.create(job=job, message=message)
            _audit_job(action, job, actor=actor, request=request, details=details)
    if not changed:
        job.refresh_from_db()
        with transaction.atomic():
            record(
                action,
                actor=actor,
                request=request,
                target=job,
                outcome=AuditEvent.FAILURE,
                details={"job": job.pk, "status": job.status, **details},
            )
        raise JobError(_("The migration is not running any more."))
    publish_job(job.pk)
    return job


def do_set_bandwidth(job, mib_per_s, actor, request=None):
    """Ask the worker to change the bandwidth cap (MiB/s, 0 = unlimited)."""
    try:
        mib_per_s = clean_control("bandwidth", mib_per_s)
    except OptionError as exc:
        raise JobError(str(exc)) from None
    return _control(
        job,
        actor,
        request,
        "migration.bandwidth",
        {"requested_bandwidth": mib_per_s},
        _("%(user)s set the bandwidth to %(bw)s.")
        % {"user": actor.get_username(), "bw": f"{mib_per_s} MiB/s" if mib_per_s else _("unlimited")},
        {"bandwidth": mib_per_s},
    )


def do_set_downtime(job, ms, actor, request=None):
    """Ask the worker to change the maximum tolerated downtime (ms)."""
    try:
        ms = clean_control("max_downtime", ms)
    except OptionError as exc:
        raise JobError(str(exc)) from None
    return _control(
        job,
        actor,
        request,
        "migration.downtime",
        {"requested_downtime": ms},
        _("%(user)s set the maximum downtime to %(ms)d ms.") % {"user": actor.get_username(), "ms": ms},
        {"downtime_ms": ms},
    )


def do_switch_postcopy(job, actor, request=None):
    """Ask the worker to switch to post-copy (only when the job enabled post-copy)."""
    if not job.postcopy_enabled:
        raise JobError(_("Post-copy was not enabled for this migration."))
    return _control(
        job,
        actor,
        request,
        "migration.postcopy",
        {"postcopy_requested": True},
        _("%(user)s asked to switch to post-copy.") % {"user": actor.get_username()},
        {},
    )


def do_delete_left_copy(copy, actor, request=None):
    """Delete a disk copy kvmweb left behind (LeftCopy) on its host and mark it removed.

    The volume is deleted first (libvirt, outside any transaction, bounded by the call
    timeout); then the row and the audit event are written together. A copy whose file is
    already gone is marked removed too. Refused while the VM has an active migration (the
    file could be the one it is moving to) or when the copy is the VM's current disk."""
    if copy.removed_at is not None:
        raise JobError(_("This copy was already deleted."))
    vm = copy.vm

    def refuse(message):
        with transaction.atomic():
            record(
                "leftcopy.delete",
                actor=actor,
                request=request,
                target=vm,
                outcome=AuditEvent.FAILURE,
                details={"host": copy.host_name, "path": copy.path, "error": message},
            )
        raise JobError(message)

    if MigrationJob.objects.active().filter(vm=vm).exists():
        refuse(_("%(vm)s has an active migration; delete the copy once it is over.") % {"vm": vm.name})
    if vm.host_id == copy.host_id and not vm.gone:
        refuse(
            _("%(vm)s runs from %(host)s again: this file is its current disk now.")
            % {"vm": vm.name, "host": copy.host_name}
        )
    if copy.host is None:
        refuse(_("The host %(host)s was removed from kvmweb.") % {"host": copy.host_name})
    try:
        with hv.session(copy.host.uri) as conn:
            existed = conn.volume_at(copy.path) is not None
            if existed:
                conn.delete_volume(copy.path)
    except hv.HypervisorError as exc:
        refuse(
            _("Deleting %(path)s on %(host)s failed: %(error)s")
            % {"path": copy.path, "host": copy.host_name, "error": exc}
        )
    with transaction.atomic():
        copy.removed_at = timezone.now()
        copy.removed_by_name = actor.get_username()
        copy.save(update_fields=["removed_at", "removed_by_name"])
        record(
            "leftcopy.delete",
            actor=actor,
            request=request,
            target=vm,
            details={"host": copy.host_name, "path": copy.path, "job": copy.job_id, "file_existed": existed},
        )
    return copy


# --- Self-service policies (moved from kvmweb/accounts/services.py) ---------------------


class PolicyError(Exception):
    """A policy change refused (the message is safe to show)."""


def do_save_policy(
    policy,
    *,
    source_group,
    target_groups,
    allowed_modes,
    max_bandwidth=None,
    requires_approval=True,
    actor,
    request=None,
):
    """Create (policy=None) or change the self-service policy of a source host group,
    audited with the before and after rule."""
    valid_modes = [mode for mode, _label in MigrationJob.MODES]
    unknown = set(allowed_modes) - set(valid_modes)
    if unknown:
        raise PolicyError(_("Unknown mode: %(mode)s") % {"mode": ", ".join(sorted(unknown))})
    action = "policy.create" if policy is None else "policy.change"
    other = SelfServicePolicy.objects.filter(source_group=source_group).exclude(
        pk=getattr(policy, "pk", None)
    )
    if other.exists():
        record_refusal(
            action,
            actor=actor,
            request=request,
            obj=policy,
            target_type="accounts.selfservicepolicy",
            name=str(source_group),
            reason="group has a policy",
        )
        raise PolicyError(
            _("The host group %(group)s has a policy already; edit that one.") % {"group": source_group}
        )
    with transaction.atomic():
        created = policy is None
        before = {} if created else policy.as_dict()
        policy = policy or SelfServicePolicy()
        policy.source_group = source_group
        policy.allowed_modes = [mode for mode in valid_modes if mode in set(allowed_modes)]
        policy.max_bandwidth = max_bandwidth
        policy.requires_approval = requires_approval
        policy.save()
        policy.target_groups.set(target_groups)
        record(
            action,
            actor=actor,
            request=request,
            target=policy,
            details={"before": before, "after": policy.as_dict()},
        )
    return policy


def do_delete_policy(policy, *, actor, request=None):
    """Remove a policy: VMs in its source group can then be moved by operators only."""
    with transaction.atomic():
        record(
            "policy.delete", actor=actor, request=request, target=policy, details={"before": policy.as_dict()}
        )
        policy.delete()


def may_force_off(user, job):
    """May ``user`` force the guest of ``job`` off while a cold move waits for it to shut
    down? Operators and administrators (they may control any job); the VM's owner when
    the self-service policy covering the VM allows cold moves (a cold request may ask for
    force off itself, so forcing off a running one asks for nothing more)."""
    from kvmweb.accounts.roles import is_self_service
    from migrations_app.policy import policy_for

    if user.has_perm("migrations_app.control_migrationjob"):
        return True
    if not is_self_service(user) or job.vm is None:
        return False
    from hosts.models import VM

    if not VM.objects.restrict(user).filter(pk=job.vm_id).exists():
        return False
    policy = policy_for(job.vm)
    return policy is not None and MigrationJob.COLD in (policy.allowed_modes or [])


def do_force_off_now(job, actor, request=None):
    """Ask the worker of a cold move that waits for the guest to shut down to force it
    off now (the journaled ``force_off`` step of modes/cold.py, at its next poll, ~0.25 s).

    Recorded only while the job runs in its shutdown phase; once the guest is off (or
    the job ended, or someone asked first) the request is refused and audited as a
    failure. Audited as ``migration.force_off``."""
    name = actor.get_username()
    with transaction.atomic():
        changed = MigrationJob.objects.filter(
            pk=job.pk,
            status=MigrationJob.RUNNING,
            mode=MigrationJob.COLD,
            phase="shutdown",
            force_off_requested=False,
        ).update(force_off_requested=True, force_off_requested_by=name, progress_seq=F("progress_seq") + 1)
        if changed:
            job.refresh_from_db()
            # Coded: every viewer reads it in their own language, not the clicker's.
            write_event(job.pk, ("force_off_asked", {"user": name}), "warn")
            _audit_job(
                "migration.force_off", job, actor=actor, request=request, details={"phase": "shutdown"}
            )
    if not changed:
        job.refresh_from_db()
        with transaction.atomic():
            record(
                "migration.force_off",
                actor=actor,
                request=request,
                target=job,
                outcome=AuditEvent.FAILURE,
                details={
                    "job": job.pk,
                    "status": job.status,
                    "phase": job.phase,
                    "error": "not shutting down",
                },
            )
        raise JobError(_("The guest is no longer waiting to shut down; nothing to force off."))
    publish_job(job.pk)
    return job

"""State changes of batches: plan, create, start, pause, resume, cancel, move back.

Each ``do_*`` writes its audit event in the same transaction as the change; refusals
are audited as failures. Planning calls libvirt (the preflight) and never runs inside a
transaction. Only operators and administrators (permission hosts.maintain_host) may
create or control batches; self-service users cannot evacuate hosts.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from fleet.models import Batch, BatchItem
from fleet.planner import make_plan
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent

PERM = "hosts.maintain_host"


class BatchError(Exception):
    """A batch request or control was refused; the message is meant for people."""


def _refuse(action, actor, target, message, request=None, **details):
    with transaction.atomic():
        record(
            action,
            actor=actor,
            request=request,
            target=target,
            outcome=AuditEvent.DENIED,
            details={"error": message, **details},
        )
    raise BatchError(message)


def check_can_batch(actor, action="batch.create", target=None, request=None):
    """Refuse (audited) unless ``actor`` may evacuate hosts and run batches."""
    if actor is None or not actor.is_authenticated or not actor.has_perm(PERM):
        _refuse(action, actor, target, _("Only operators and administrators can run batches."), request)


def evacuation_vms(host):
    """The VMs an evacuation of ``host`` moves: every VM kvmweb sees on it."""
    from hosts.models import VM

    return list(VM.objects.filter(host=host, gone=False).select_related("host").order_by("name"))


def plan_evacuation(host, actor, **kwargs):
    """The plan for emptying ``host`` (fleet.planner.make_plan); nothing is changed."""
    check_can_batch(actor, "batch.plan", host)
    return make_plan(evacuation_vms(host), actor, **kwargs)


def do_create_batch(
    plan,
    actor,
    *,
    kind=Batch.EVACUATE,
    host=None,
    parent=None,
    stop_on_failure=False,
    request=None,
    start=True,
    not_before=None,
    not_after=None,
    ignore_blackouts=False,
):
    """Store ``plan`` as a batch (one item per row; blocked rows are kept as "stays" with
    their reasons) and start it unless ``start`` is False. Audited: the plan, the start."""
    check_can_batch(actor, "batch.create", host, request)
    if ignore_blackouts and not actor.has_perm("migrations_app.override_preflight"):
        _refuse("batch.create", actor, host, _("Only administrators may ignore blackout windows."), request)
    if not_before and not_after and not_after <= not_before:
        _refuse("batch.create", actor, host, _("The window closes before it opens."), request)
    limits = plan.limits
    with transaction.atomic():
        batch = Batch.objects.create(
            kind=kind,
            host=host,
            host_name=host.name if host else "",
            parent=parent,
            max_parallel=limits["max_parallel"],
            per_source=limits["per_source"],
            per_target=limits["per_target"],
            stop_on_failure=stop_on_failure,
            not_before=not_before,
            not_after=not_after,
            ignore_blackouts=bool(ignore_blackouts),
            predicted_seconds=plan.total_seconds,
            plan=plan.to_dict(),
            created_by=actor,
            created_by_name=actor.get_username(),
        )
        for position, row in enumerate(plan.rows):
            BatchItem.objects.create(
                batch=batch,
                vm=row.vm,
                vm_name=row.vm.name,
                source=row.source,
                source_name=row.source.name if row.source else "",
                target=row.target if row.placed else None,
                target_name=row.target.name if row.placed and row.target else "",
                mode=row.mode if row.placed else "",
                options=row.options if row.placed else {},
                position=position,
                status=BatchItem.PENDING if row.placed else BatchItem.BLOCKED,
                reason="" if row.placed else "; ".join(row.reasons),
                predicted_seconds=row.predicted_seconds,
                predicted_downtime_ms=row.predicted_downtime_ms,
                report=row.report if row.placed else {},
            )
        record(
            "batch.plan",
            actor=actor,
            request=request,
            target=batch,
            details={"batch": batch.pk, **plan.to_dict()},
        )
        if start:
            _start(batch, actor, request)
    return batch


def _start(batch, actor, request):
    if not Batch.objects.filter(pk=batch.pk, status=Batch.PLANNED).update(
        status=Batch.RUNNING, started_at=timezone.now()
    ):
        raise BatchError(_("This batch was already started."))
    batch.refresh_from_db()
    record(
        "batch.start",
        actor=actor,
        request=request,
        target=batch,
        details={
            "batch": batch.pk,
            "limits": batch.plan.get("limits", {}),
            "stop_on_failure": batch.stop_on_failure,
        },
    )


def do_start_batch(batch, actor, request=None):
    """PLANNED -> RUNNING (the scheduler picks it up at its next pass)."""
    check_can_batch(actor, "batch.start", batch, request)
    try:
        with transaction.atomic():
            _start(batch, actor, request)
    except BatchError as exc:
        _refuse("batch.start", actor, batch, str(exc), request)
    return batch


def _control(batch, actor, request, action, from_states, to, message, **fields):
    check_can_batch(actor, action, batch, request)
    with transaction.atomic():
        moved = Batch.objects.filter(pk=batch.pk, status__in=from_states).update(status=to, **fields)
        if moved:
            batch.refresh_from_db()
            record(
                action,
                actor=actor,
                request=request,
                target=batch,
                details={"batch": batch.pk, "status": to, **fields},
            )
    if not moved:
        batch.refresh_from_db()
        _refuse(action, actor, batch, message % {"status": batch.get_status_display()}, request)
    return batch


def do_pause_batch(batch, actor, request=None):
    """No new children start; running ones finish."""
    return _control(
        batch,
        actor,
        request,
        "batch.pause",
        [Batch.RUNNING],
        Batch.PAUSED,
        _("The batch is %(status)s; only a running batch can be paused."),
    )


def do_resume_batch(batch, actor, request=None):
    """A paused batch starts children again."""
    return _control(
        batch,
        actor,
        request,
        "batch.resume",
        [Batch.PAUSED],
        Batch.RUNNING,
        _("The batch is %(status)s; only a paused batch can be resumed."),
    )


def do_cancel_batch(batch, actor, *, cancel_running=False, request=None):
    """No new children start; running children finish, or are cancelled when
    ``cancel_running`` (the scheduler asks their workers to abort)."""
    return _control(
        batch,
        actor,
        request,
        "batch.cancel",
        [Batch.PLANNED, Batch.RUNNING, Batch.PAUSED, Batch.STOPPING],
        Batch.CANCELLING,
        _("The batch is %(status)s; it cannot be cancelled."),
        cancel_running=bool(cancel_running),
    )


def move_back_overrides(batch):
    """{vm id: {"target": origin host id, "mode": mode}} for the VMs ``batch`` moved that
    are still where it put them."""
    out = {}
    for item in batch.items.filter(status=BatchItem.SUCCEEDED).select_related("vm"):
        vm = item.vm
        if vm.gone or item.source_id is None or vm.host_id != item.target_id:
            continue
        out[vm.pk] = {"target": item.source_id}
    return out


def plan_move_back(batch, actor, **kwargs):
    """The reverse of ``batch``: its moved VMs back to where they came from, through the
    same planner (modes chosen again from the VMs' current state)."""
    from hosts.models import VM

    check_can_batch(actor, "batch.plan", batch)
    overrides = move_back_overrides(batch)
    vms = list(VM.objects.filter(pk__in=overrides).select_related("host").order_by("name"))
    return make_plan(vms, actor, overrides=overrides, **kwargs)


def delete_stale_copies(batch, actor, request=None):
    """The disk copies ``batch``'s own children left on the origin host (live + storage
    copy keeps the source file): they hold the data as it was at the move, so moving the
    VM back over them is refused by the preflight. Moving back replaces them, so they are
    deleted first (migrations_app.services.do_delete_left_copy: audited, refused while the
    VM has an active job). Returns the paths deleted."""
    from migrations_app.models import LeftCopy
    from migrations_app.services import JobError, do_delete_left_copy

    jobs = batch.items.filter(status=BatchItem.SUCCEEDED).values("job_id")
    deleted = []
    for copy in LeftCopy.objects.filter(job__in=jobs, host_id=batch.host_id, removed_at__isnull=True):
        try:
            do_delete_left_copy(copy, actor, request)
        except JobError:
            continue  # the planner's preflight then says why this VM stays
        deleted.append(copy.path)
    return deleted


def do_move_back(batch, actor, request=None, **kwargs):
    """Plan and start the reverse batch of ``batch`` (refused while its host is still in
    maintenance: the planner would find the origin unavailable). The stale disk copies
    the evacuation left on the origin are deleted first (delete_stale_copies)."""
    from hosts.models import Host

    if Host.objects.filter(pk=batch.host_id, maintenance=True).exists():
        _refuse(
            "batch.create",
            actor,
            batch,
            _("End the maintenance of %(h)s first.") % {"h": batch.host_name},
            request,
        )
    delete_stale_copies(batch, actor, request)
    plan = plan_move_back(batch, actor, **kwargs)
    return do_create_batch(plan, actor, kind=Batch.MOVE_BACK, host=batch.host, parent=batch, request=request)


def do_set_vm_tags(vm, actor, *, add=(), remove=(), request=None):
    """Add or remove anti-affinity tags of ``vm`` (fleet.models.VMTag; audited
    ``vm.tags`` with the tags before and after). Operators and administrators only."""
    from fleet.models import VMTag

    check_can_batch(actor, "vm.tags", vm, request)
    names = {t.strip()[:64] for t in add if t and t.strip()}
    with transaction.atomic():
        before = sorted(VMTag.objects.filter(vm=vm).values_list("name", flat=True))
        for name in names:
            VMTag.objects.get_or_create(vm=vm, name=name)
        VMTag.objects.filter(vm=vm, name__in=[t.strip() for t in remove]).delete()
        after = sorted(VMTag.objects.filter(vm=vm).values_list("name", flat=True))
        record("vm.tags", actor=actor, request=request, target=vm, details={"before": before, "after": after})
    return after


def do_create_blackout(group, starts_at, ends_at, actor, *, reason="", request=None):
    """A blackout window for a host group (audited ``blackout.create``): no batch child
    starts from or to its hosts between ``starts_at`` and ``ends_at``. Administrators
    only (hosts.change_hostgroup)."""
    from fleet.models import Blackout

    if actor is None or not actor.has_perm("hosts.change_hostgroup"):
        _refuse("blackout.create", actor, group, _("Only administrators may set blackout windows."), request)
    if ends_at <= starts_at:
        _refuse("blackout.create", actor, group, _("The window closes before it opens."), request)
    with transaction.atomic():
        blackout = Blackout.objects.create(
            group=group,
            starts_at=starts_at,
            ends_at=ends_at,
            reason=reason,
            created_by_name=actor.get_username(),
        )
        record(
            "blackout.create",
            actor=actor,
            request=request,
            target=group,
            details={"starts_at": starts_at.isoformat(), "ends_at": ends_at.isoformat(), "reason": reason},
        )
    return blackout

"""The batch scheduler: one pass (``tick``) starts the next children of a batch within
its limits, follows the children that ended, and finishes the batch.

Crash safety:
- A pass first claims the batch with a conditional UPDATE of ``lease_until`` (only when
  it is in the past); two schedulers (the periodic task, `manage.py evacuate --wait`)
  never run a pass of one batch at once. A killed scheduler's lease simply expires.
- A child is created by migrations_app.services.do_create_job INSIDE the transaction that
  also moves its item from pending to started and stores ``item.job``: either both
  exist or neither, so a restart never loses a child and never starts one twice (the
  item is not pending any more; the VM's one-active-job constraint is a second guard).
  The job is queued on commit; a message lost in a crash is re-queued by
  migrations_app.reconcile (jobs waiting in QUEUED too long).
- No child is left behind by a crash even where no reconcile pass runs (the default
  cluster's schedule is down, or only `evacuate --wait` drives the batch): every pass
  queues again a child that waited in QUEUED unclaimed for
  KVMWEB_FLEET_CHILD_REQUEUE_SECONDS (its message was lost: a scheduler killed between
  the commit and the on-commit message, or a migrations worker killed after taking the
  message and before its claim), and reconciles a child whose worker stopped
  heartbeating (``_rescue_children``).
- Limits are enforced where a child starts: the worker's claim (fleet/limits.py, a
  gate of migrations_app/windows.py: count subqueries in its conditional UPDATE,
  serialized by a lock row). A pass counts them too (active MigrationJobs by source, by
  target, in total, and this batch's started items, from the database, so a restart sees
  what runs) to start children that may run now, and then creates the next one ahead
  while they are full (pipelining, ``pipeline_depth``): it waits at its claim, held
  "waiting for a free slot", until the worker that frees a slot runs it
  (migrations_app/tasks.run_migration) or a pass releases it. Pause, stop and cancel
  withdraw children no worker claimed (``_withdraw_unclaimed``).
- libvirt (the preflight) is called before the transaction opens, never inside it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from fleet.limits import CLAIMED
from fleet.models import Batch, BatchItem, blackout_for, blackout_text
from kvmweb import qbroker
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from migrations_app import states
from migrations_app.jobrun import writing
from migrations_app.lifecycle import ENDED
from migrations_app.models import MigrationJob

log = logging.getLogger(__name__)

LEASE_SECONDS = 20.0  # renewed before every child is started (a pass may run preflights)
JOB_TO_ITEM = {
    states.SUCCEEDED: BatchItem.SUCCEEDED,
    states.FAILED: BatchItem.FAILED,
    states.CANCELLED: BatchItem.CANCELLED,
    states.REJECTED: BatchItem.FAILED,
}


def global_limit():
    return int(getattr(settings, "KVMWEB_FLEET_GLOBAL_LIMIT", 5))


def claim(batch_id, owner, seconds=LEASE_SECONDS, status=None):
    """Take the batch's lease (conditional UPDATE). True when this caller owns the pass.
    ``status``: only while the batch is in that state."""
    with writing():
        now = timezone.now()
        return bool(
            Batch.objects.filter(pk=batch_id, status__in=[status] if status else Batch.ACTIVE_STATES)
            .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now) | Q(lease_owner=owner))
            .update(lease_owner=owner, lease_until=now + timedelta(seconds=seconds))
        )


def release(batch_id, owner):
    with writing():
        Batch.objects.filter(pk=batch_id, lease_owner=owner).update(lease_until=None, lease_owner="")


def _audit(action, batch, outcome=AuditEvent.SUCCESS, **details):
    record(
        action,
        actor=None,
        target=batch,
        outcome=outcome,
        details={"batch": batch.pk, "kind": batch.kind, "host": batch.host_name, **details},
    )


MAX_RETRIES = 1
# Journal steps that change nothing on a host (migrations_app/journal.py): a cold or
# offline child whose journal holds only these never touched the VM.
HARMLESS_STEPS = {"begin", "storage"}


def lost_with_its_worker(item, job):
    """The child failed only because its worker died before libvirt moved anything:
    reconcile (worker "reconcile:...") concluded it failed, the VM is still on the item's
    source, not gone, and a journaled (cold, offline) child never started a step with a
    side effect (a shutdown, a volume, a definition). Such a child may be retried once:
    the VM was never migrated nor stopped (docs/fleet.md says why once, and why not a
    child that was rolled back)."""
    from hosts.models import VM

    return (
        job.status == states.FAILED
        and job.worker.startswith("reconcile:")
        and item.attempts < MAX_RETRIES
        and all(entry.get("step") in HARMLESS_STEPS for entry in job.journal or [])
        and VM.objects.filter(pk=item.vm_id, host_id=item.source_id, gone=False).exists()
    )


def _follow_children(batch):
    """Items whose child job reached a final state take its outcome (or, for a child
    lost with its worker, go back to pending for one more attempt). Returns True when an
    item went back to pending."""
    retried = False
    started = batch.items.filter(status=BatchItem.STARTED, job__status__in=states.FINAL)
    for item in started.select_related("job"):
        job = item.job
        outcome = BatchItem.MISSED if job.missed_window else JOB_TO_ITEM[job.status]
        if lost_with_its_worker(item, job):
            with writing(), transaction.atomic():
                if BatchItem.objects.filter(pk=item.pk, status=BatchItem.STARTED, job=job).update(
                    status=BatchItem.PENDING,
                    job=None,
                    attempts=item.attempts + 1,
                    previous_jobs=[*item.previous_jobs, job.pk],
                ):
                    retried = True
                    _audit(
                        "batch.decision",
                        batch,
                        AuditEvent.FAILURE,
                        vm=item.vm_name,
                        decision="retry",
                        job=job.pk,
                        error=job.error,
                    )
            continue
        with writing(), transaction.atomic():
            moved = BatchItem.objects.filter(pk=item.pk, status=BatchItem.STARTED).update(
                status=outcome, finished_at=job.finished_at or timezone.now(), reason=job.error or ""
            )
            if moved:
                _audit(
                    "batch.item_end",
                    batch,
                    AuditEvent.SUCCESS if outcome == BatchItem.SUCCEEDED else AuditEvent.FAILURE,
                    vm=item.vm_name,
                    job=job.pk,
                    status=outcome,
                )
    return retried


def child_requeue_seconds():
    return float(getattr(settings, "KVMWEB_FLEET_CHILD_REQUEUE_SECONDS", 15))


# A child in needs_reconcile is reconciled by this process at most this often (a host
# that stays unreachable sends it back to needs_reconcile "will retry" every time).
RECONCILE_EVERY_SECONDS = 5.0
_reconciled_at = {}


def _rescue_children(batch, now=None):
    """The crash cases no other part of a pass would ever see end (docs/fleet.md):

    - a child QUEUED, not held by a window or a gate (``waiting_for`` empty), that no
      worker claimed within child_requeue_seconds of being queued (or queued again) lost
      its message: queued again. A worker picks a message up in well under a second; the
      message is lost when the scheduler dies between the job's commit and the
      on-commit message, or when the migrations cluster is killed after taking it and
      before its claim (the ORM broker redelivers only after ``retry``, hours later). A
      duplicate is harmless: the worker's claim lets one delivery in.
    - a child whose worker stopped heartbeating for reconcile.STALE_SECONDS, or that waits
      in needs_reconcile: reconciled here (reconcile_jobs(job_ids=...): conditional claims,
      so the default cluster's reconcile pass doing the same is harmless). Without this a
      batch driven only by `evacuate --wait` would wait forever for a child whose worker
      died after the last reconcile pass. A migration libvirt still runs is re-attached and
      followed to its end inside this pass (its lease lapses meanwhile; other schedulers
      may pass, the claims keep them apart).
    - a child held at its claim (a blackout) whose reason is over is released, and one
      whose window closed ends as missed, as windows.release_due does.
    Returns (requeued job ids, reconciled job ids)."""
    from migrations_app import reconcile, windows

    now = now or timezone.now()
    children = MigrationJob.objects.filter(batch_item__batch=batch, batch_item__status=BatchItem.STARTED)
    requeued = (
        []
        if _messages_waiting()
        else reconcile.requeue_lost(now, jobs=children, after=child_requeue_seconds())
    )
    # A child held at its worker's claim (a blackout began between its creation and the
    # claim, or it was created ahead and waits for a slot) waits for windows.release_due,
    # the default cluster's reconcile pass: do the same for this batch's children, so a
    # batch never depends on that cluster.
    held = children.filter(status=states.QUEUED, not_after__lt=now).exclude(waiting_for="")
    for job in held.select_related("source", "target"):
        windows.miss(job, now)
    released = _release_first_held(batch, now)
    if released:
        requeued.append(released)
    stale = now - timedelta(seconds=reconcile.STALE_SECONDS)
    due = list(
        children.filter(
            Q(status__in=states.WORKING, heartbeat_at__lt=stale) | Q(status=states.NEEDS_RECONCILE)
        ).values_list("pk", flat=True)
    )
    clock = time.monotonic()
    due = [
        pk
        for pk in due
        if clock - _reconciled_at.get(pk, -RECONCILE_EVERY_SECONDS) >= RECONCILE_EVERY_SECONDS
    ]
    for pk in [pk for pk, at in _reconciled_at.items() if clock - at > 60]:
        del _reconciled_at[pk]
    if due:
        _reconciled_at.update(dict.fromkeys(due, clock))
        reconcile.reconcile_jobs(now, job_ids=due)
    return requeued, due


# Seconds a pass leaves a freed slot to the worker that freed it (see _release_first_held);
# a slot freed by a landing (the child concludes beside the next child's start) for
# LANDED_GRACE: its worker claims the next child within ~0.1 s of the landing, and one
# killed meanwhile must not keep the batch's releases waiting for reconcile.
SUCCESSOR_GRACE = 0.5
LANDED_GRACE = 3.0


def _release_first_held(batch, now=None):
    """Release (queue) the first held child of the batch, in row order, that may start
    now: a child created ahead once a slot is free, or one a blackout held once it is
    over. One at a time, and none while a child released (or created with room) is
    still on its way to its claim: two released for one free slot would race for it in
    any order. Returns the job id released, or None."""
    from migrations_app import windows

    now = now or timezone.now()
    queued = MigrationJob.objects.filter(
        batch_item__batch=batch, batch_item__status=BatchItem.STARTED, status=states.QUEUED
    )
    if queued.filter(waiting_for="").exists():
        return None
    # The worker that ended a child claims the next one itself a few ms later
    # (fleet/limits.successor). Released here too, its message would send a second worker
    # to a claim that is refused, on the same locks at the same moment (benchmarks/
    # evacuate.py: 50-70 ms on the next child's start). A worker that does not chain
    # (stopping, out of chain time, killed) leaves it to the first pass after the grace:
    # the next interval's (1 s with evacuate --wait, 2 s with the periodic watcher).
    # finished_at is the worker's clock: a skewed one lengthens or shortens the grace.
    # A child that has landed (jobrun.conclude_success) frees its slot before it ends,
    # and its worker claims the next child at that moment: the same holds from the
    # landing, for LANDED_GRACE (a worker killed meanwhile leaves a job that only
    # reconcile ends, maybe much later: its freed slot is released then).
    ended = MigrationJob.objects.filter(batch_item__batch=batch).filter(
        Q(finished_at__gt=now - timedelta(seconds=SUCCESSOR_GRACE))
        | Q(status__in=CLAIMED, landed_at__gt=now - timedelta(seconds=LANDED_GRACE))
    )
    if ended.exists():
        return None
    # The common case between two child ends: the batch's own children fill its
    # max_parallel, so nothing may start; the per-child gate below (every limit, ~15 ms
    # a child) is not asked.
    if MigrationJob.objects.filter(batch_item__batch=batch, status__in=CLAIMED).count() >= batch.max_parallel:
        return None
    held = queued.select_related("source", "target").order_by("batch_item__position", "batch_item__id")
    for job in held:
        if windows.why_not_due(job, now):
            continue
        return job.pk if windows.release(job) else None
    return None


def _withdraw_unclaimed(batch):
    """Children no worker claimed yet (pipelined, or their message still on its way) of a
    batch that was paused, stops or is cancelled: their claim already refuses them (the
    batch is not running, fleet/limits.py); here each job ends cancelled (nothing ran,
    the VM untouched; it must not hold the VM's one active job for the whole pause) and,
    in the same transaction, its item goes back to pending (paused: resume starts it
    again, in its row's place) or ends skipped / cancelled. Conditional on the job still
    being queued: a child a worker claimed first is a started child like any other."""
    from migrations_app import events
    from migrations_app.lifecycle import transition

    to, reason = {
        Batch.PAUSED: (BatchItem.PENDING, ""),
        Batch.STOPPING: (BatchItem.SKIPPED, _("Not started: the batch stops after its first failure.")),
    }.get(batch.status, (BatchItem.CANCELLED, _("Not started: the batch was cancelled.")))
    parts = events.parts(("err_cancelled_before_start", {}))
    for item in batch.items.filter(status=BatchItem.STARTED, job__status=states.QUEUED).select_related("job"):
        job = item.job
        with transaction.atomic():
            if not transition(
                job.pk,
                states.CANCELLED,
                from_=[states.QUEUED],
                error=events.english(parts),
                error_parts=parts,
                waiting_for="",
                event=f"Withdrawn before it started: batch #{batch.pk} is {batch.status}.",
                level="warn",
            ):
                continue
            if to == BatchItem.PENDING:
                fields = {"job": None, "started_at": None, "previous_jobs": [*item.previous_jobs, job.pk]}
            else:
                fields = {"finished_at": timezone.now(), "reason": reason}
            BatchItem.objects.filter(pk=item.pk, status=BatchItem.STARTED, job=job).update(
                status=to, **fields
            )
            _audit("batch.decision", batch, vm=item.vm_name, decision="withdrawn", job=job.pk, status=to)


def _messages_waiting():
    """True when the migrations queue holds messages no worker has taken yet (every
    worker busy, or the cluster down). A lost message is never among them (never sent,
    or taken by a worker that died: the ORM broker locks a taken message), so while any
    wait, a child unclaimed for the re-queue interval may simply be queued behind them,
    and a duplicate would only queue behind them too: with fewer workers than the
    limits allow, a waiting child was re-sent every interval. Re-sent once the queue
    drained and it is still unclaimed. One count query per pass."""
    from django_q.brokers import get_broker

    try:
        return get_broker("migrations").queue_size() > 0
    except Exception:  # a broker that cannot say: re-send as before
        log.exception("cannot read the migrations queue's size")
        return False


def _skip_pending(batch, reason, status=BatchItem.SKIPPED):
    with transaction.atomic():
        n = batch.items.filter(status=BatchItem.PENDING).update(
            status=status, reason=reason, finished_at=timezone.now()
        )
        if n:
            _audit("batch.skip", batch, skipped=n, reason=reason)


def _finish(batch):
    """No open item left: the batch ends (succeeded, failed or cancelled)."""
    counts = batch.counts()
    if batch.status == Batch.CANCELLING:
        final = Batch.CANCELLED
    elif (
        counts[BatchItem.FAILED]
        or counts[BatchItem.BLOCKED]
        or counts[BatchItem.SKIPPED]
        or counts[BatchItem.CANCELLED]
        or counts[BatchItem.MISSED]
    ):
        final = Batch.FAILED
    else:
        final = Batch.SUCCEEDED
    with writing(), transaction.atomic():
        if Batch.objects.filter(pk=batch.pk, status=batch.status).update(
            status=final, finished_at=timezone.now()
        ):
            batch.status = final
            _audit(
                "batch.end",
                batch,
                AuditEvent.SUCCESS if final == Batch.SUCCEEDED else AuditEvent.FAILURE,
                status=final,
                counts=counts,
            )


def _active_counts():
    """Active migration jobs (all of kvmweb, not only batches) by source, by target, total."""
    by_source, by_target, total = {}, {}, 0
    # One query (grouped by the pair), not three: this runs on every freed slot's path.
    pairs = MigrationJob.objects.filter(status__in=states.ACTIVE).values_list("source_id", "target_id")
    for source_id, target_id, n in pairs.annotate(n=Count("id")).values_list("source_id", "target_id", "n"):
        by_source[source_id] = by_source.get(source_id, 0) + n
        by_target[target_id] = by_target.get(target_id, 0) + n
        total += n
    return by_source, by_target, total


def report_reuse_seconds():
    return float(getattr(settings, "KVMWEB_FLEET_REPORT_REUSE_SECONDS", 300))


def _recent_report(item):
    """The planner's full preflight report of this item when it is recent enough
    (KVMWEB_FLEET_REPORT_REUSE_SECONDS) and passed: the gate do_create_job needs. The
    worker runs the checklist again right before it migrates (migrations_app/runner.py),
    so a report a few minutes old never lets a migration start on stale facts; it only
    saves this pass a second checklist per child."""
    from migrations_app.preflight import Report

    data = item.report or {}
    if not data.get("started_at"):
        return None
    try:
        started = datetime.fromisoformat(data["started_at"])
    except ValueError:
        return None
    if (timezone.now() - started).total_seconds() > report_reuse_seconds():
        return None
    report = Report.from_dict(data)
    return None if report.fails else report


def _start_item(batch, item, owner=None, pipelined=False):
    """Preflight (outside any transaction), then create the child job and link it to the
    item in one transaction, while ``owner`` still holds the batch's lease. Returns True
    when a child was created. ``pipelined``: created while the limits are full, to be
    claimed when a slot frees (recorded in its audit event)."""
    from migrations_app.plan import MigrationPlan, PlanError
    from migrations_app.preflight import run_preflight
    from migrations_app.services import JobError, do_create_job, messages_held

    vm = item.vm
    vm.refresh_from_db()
    if vm.host_id != item.source_id or vm.gone:
        with transaction.atomic():
            if BatchItem.objects.filter(pk=item.pk, status=BatchItem.PENDING, job__isnull=True).update(
                status=BatchItem.SKIPPED,
                reason=_("The VM is not on %(h)s any more.") % {"h": item.source_name},
            ):
                _audit("batch.decision", batch, AuditEvent.FAILURE, vm=item.vm_name, decision="skipped")
        return False
    options = dict(item.options or {})
    if item.mode == "cold":
        options.setdefault("start_on_target", vm.is_running)  # no libvirt call in do_create_job
    try:
        vm.host = item.source  # the same row (checked above): no second query for it
        plan = MigrationPlan(vm, vm.host, item.target, item.mode, options)
        report = _recent_report(item) or run_preflight(plan, measure_dirty_rate=False)
    except PlanError as exc:
        report, error = None, str(exc)
    else:
        error = ""
    actor = batch.created_by
    with writing(), transaction.atomic():
        # The preflight may outlast the lease (PREFLIGHT_TIMEOUT is as long): when another
        # scheduler took the batch meanwhile, it counted the limits without this child and
        # may fill them; starting it now would exceed them. Renewed only by its owner, in
        # this transaction, so the other's claim sees the renewal or this one fails.
        if owner is not None and not Batch.objects.filter(
            pk=batch.pk, status=Batch.RUNNING, lease_owner=owner
        ).update(lease_until=timezone.now() + timedelta(seconds=LEASE_SECONDS)):
            return False
        # The conditional UPDATE is the claim of this item: a second scheduler (after a
        # lease expired mid-pass) finds it not pending and creates nothing.
        if not BatchItem.objects.filter(pk=item.pk, status=BatchItem.PENDING, job__isnull=True).update(
            status=BatchItem.STARTED, started_at=timezone.now()
        ):
            return False
        job = None
        if report is not None:
            # A child created ahead gets no message: it could only be refused at a
            # worker's claim (the limits are full) and held, while the running children's
            # claims and conclusions wait on the same locks. A release sends it (the
            # worker that frees a slot claims it directly: fleet/limits.successor).
            unsent = messages_held() if pipelined else contextlib.nullcontext()
            try:
                with unsent:
                    job = do_create_job(
                        vm,
                        item.target,
                        item.mode,
                        options,
                        actor=actor,
                        report=report,
                        acknowledged=[r.id for r in report.warnings],
                        reason=_("Batch #%(b)d (%(k)s)") % {"b": batch.pk, "k": batch.get_kind_display()},
                        # The worker's claim enforces the batch's window end and blackouts too.
                        not_after=batch.not_after,
                        ignore_blackouts=batch.ignore_blackouts,
                    )
            except JobError as exc:
                error = str(exc)
        if job is None:
            BatchItem.objects.filter(pk=item.pk).update(
                status=BatchItem.FAILED, reason=error, finished_at=timezone.now()
            )
            _audit(
                "batch.decision", batch, AuditEvent.FAILURE, vm=item.vm_name, decision="refused", error=error
            )
            return False
        BatchItem.objects.filter(pk=item.pk).update(job=job)
        if pipelined:
            # Held from the start: only a release (the worker that frees a slot, or a
            # pass, first rows first) lets it be claimed, not its own first message.
            from fleet.limits import holds

            reason = holds(job) or _(
                "Created ahead of a free slot: it starts when released, after the rows before it."
            )
            MigrationJob.objects.filter(pk=job.pk).update(waiting_for=reason[:500])
        _audit(
            "batch.decision",
            batch,
            vm=item.vm_name,
            decision="started",
            job=job.pk,
            source=item.source_name,
            target=item.target_name,
            mode=item.mode,
            pipelined=pipelined,
        )
    return True


def tick(batch_id, owner=None, rescue=True):
    """One pass over batch ``batch_id``; returns the batch's status after it (or None
    when another scheduler holds the batch or it is not active). ``rescue=False`` leaves
    out the crash cases (``_rescue_children``: they wait seconds by design): ``drive``
    looks at them at most once a second."""
    owner = owner or uuid.uuid4().hex
    if not claim(batch_id, owner):
        return None
    try:
        batch = Batch.objects.get(pk=batch_id)
        # A freed slot is used first: the ended children's item ends and audit lines are
        # then not on the next child's critical path (one more transaction per wave).
        # `mine` counts only children still active, so an ended child not followed yet
        # frees its slot. Not with "stop on first failure": an ended child may be the
        # failure that must stop the batch before anything else starts.
        early = _may_start(batch) and not batch.stop_on_failure
        if early:
            # A child created ahead takes a freed slot first (when the worker that freed
            # it did not: fleet/limits.successor).
            _release_first_held(batch)
            _start_next(batch, owner)
        retried = _follow_children(batch)
        if (
            batch.status == Batch.RUNNING
            and batch.stop_on_failure
            and batch.items.filter(status=BatchItem.FAILED).exists()
        ):
            with transaction.atomic():
                if Batch.objects.filter(pk=batch.pk, status=Batch.RUNNING).update(status=Batch.STOPPING):
                    batch.status = Batch.STOPPING
                    _audit("batch.stop", batch, AuditEvent.FAILURE, reason="stop on first failure")
        if batch.status in (Batch.PAUSED, Batch.STOPPING, Batch.CANCELLING):
            _withdraw_unclaimed(batch)
        if batch.status == Batch.STOPPING:
            _skip_pending(batch, _("Not started: the batch stops after its first failure."))
        if batch.status == Batch.CANCELLING:
            _skip_pending(batch, _("Not started: the batch was cancelled."), BatchItem.CANCELLED)
            if batch.cancel_running:
                from migrations_app.services import JobError, do_cancel_job

                for item in batch.items.filter(
                    status=BatchItem.STARTED, job__cancel_requested=False
                ).select_related("job"):
                    try:
                        do_cancel_job(item.job, batch.created_by)
                    except JobError:
                        pass  # it ended meanwhile: followed at the next pass
        if batch.status == Batch.RUNNING and batch.not_after and timezone.now() > batch.not_after:
            _skip_pending(
                batch,
                _("Not started before the window closed at %(t)s.")
                % {"t": batch.not_after.isoformat(timespec="minutes")},
                BatchItem.MISSED,
            )
        if _may_start(batch) and (retried or not early):
            _start_next(batch, owner)
        # Off the critical path: what it rescues is followed at the next pass.
        if rescue:
            _rescue_children(batch)
        if not batch.items.filter(status__in=BatchItem.OPEN).exists() and batch.status != Batch.PAUSED:
            _finish(batch)
        return batch.status
    finally:
        release(batch_id, owner)


def _may_start(batch):
    """The batch runs and its window is open (children may start now)."""
    now = timezone.now()
    return (
        batch.status == Batch.RUNNING
        and not (batch.not_before and now < batch.not_before)
        and not (batch.not_after and now > batch.not_after)
    )


def _start_next(batch, owner):
    waiting = _start_within_limits(batch, owner)
    text = "; ".join(sorted(set(waiting)))[:500]
    if text != batch.waiting_for:
        Batch.objects.filter(pk=batch.pk).update(waiting_for=text)


def pipeline_depth(batch):
    """Children created ahead (unclaimed) per batch at most: KVMWEB_FLEET_PIPELINE (2),
    never more than the batch runs at once (two children of a wave often end together)."""
    return min(int(getattr(settings, "KVMWEB_FLEET_PIPELINE", 2)), batch.max_parallel)


def _start_within_limits(batch, owner):
    """Start pending items, in order, while every limit has room; then pipeline: create
    the next child(ren) ahead while the limits are full (``pipeline_depth`` unclaimed
    children per batch at most), so the worker that frees a slot finds one ready to claim
    (fleet/limits.py: the claim enforces the limits). The lease is renewed before each
    start, so a pass slowed by preflights never overlaps another's."""
    # Children still active (an ended child not followed yet holds no slot).
    mine = batch.items.filter(status=BatchItem.STARTED).exclude(job__status__in=states.FINAL).count()
    unclaimed = batch.items.filter(status=BatchItem.STARTED, job__status=states.QUEUED).count()
    if mine >= batch.max_parallel and unclaimed >= pipeline_depth(batch):
        # Between two child ends, the common case: the batch's own children fill it and
        # the children created ahead are there: nothing to start, nothing to create.
        return []
    by_source, by_target, total = _active_counts()
    now, waiting = timezone.now(), []
    limit = global_limit()
    pending = list(batch.items.filter(status=BatchItem.PENDING).select_related("vm", "source", "target"))
    ready = []  # not started now only for the limits: may be pipelined
    for item in pending:
        if (
            mine >= batch.max_parallel
            or total >= limit
            or by_source.get(item.source_id, 0) >= batch.per_source
            or by_target.get(item.target_id, 0) >= batch.per_target
        ):
            ready.append(item)
            continue
        if _blacked_out(batch, item, now, waiting):
            continue
        # One conditional UPDATE renews the lease and checks the batch still runs: paused
        # or cancelled meanwhile, or the lease ran out and another scheduler took the
        # batch (it counts anew): start nothing more.
        if not claim(batch.pk, owner, status=Batch.RUNNING):
            return waiting
        if _start_item(batch, item, owner):
            mine += 1
            unclaimed += 1  # queued (a claim meanwhile: one fewer ahead now, counted next pass)
            total += 1
            by_source[item.source_id] = by_source.get(item.source_id, 0) + 1
            by_target[item.target_id] = by_target.get(item.target_id, 0) + 1
    # Pipelined children wait at their claim (held "waiting for a free slot") and count
    # as queued here, so the next pass creates no other child for the same slot. A child
    # still queued (pipelined, or its message on its way) is already one of the next to
    # take a slot: fewer than pipeline_depth of them, in row order (fleet/limits.successor
    # and the release in _rescue_children take the first).
    for item in ready:
        if unclaimed >= pipeline_depth(batch):
            break
        if _blacked_out(batch, item, now, []):
            continue
        if not claim(batch.pk, owner, status=Batch.RUNNING):
            break
        if _start_item(batch, item, owner, pipelined=True):
            unclaimed += 1
    return waiting


def _blacked_out(batch, item, now, waiting):
    """True (and the reason appended to ``waiting``) when a blackout holds the item."""
    if batch.ignore_blackouts:
        return False
    blackout = blackout_for(item.source, now) or blackout_for(item.target, now)
    if blackout is not None:
        waiting.append(blackout_text(blackout))
    return blackout is not None


def run_active(owner=None):
    """One pass over every active batch."""
    return {b: tick(b, owner) for b in Batch.objects.active().values_list("pk", flat=True)}


# Between full passes, a watcher on PostgreSQL (workers on other machines send it no
# wake-up) asks this often whether a child ended (one indexed query): the next pass then
# runs within this time, not a pass interval later.
REACT_SECONDS = 0.03
# On SQLite every worker runs on this machine and wakes the watcher when a job ends
# (migrations_app/lifecycle.py ENDED): it then asks only this often, for a wake-up that
# did not arrive. Asking every 30 ms was most of the scheduler's CPU in an evacuation
# (33 queries a second beside the migrations on the same cores).
WOKEN_POLL_SECONDS = 0.5


def child_ended(batch_id=None):
    """True when a started item's child job reached a final state (a pass has work):
    of batch ``batch_id``, or of any active batch."""
    items = BatchItem.objects.filter(status=BatchItem.STARTED, job__status__in=states.FINAL)
    if batch_id is None:
        return items.filter(batch__status__in=Batch.ACTIVE_STATES).exists()
    return items.filter(batch_id=batch_id).exists()


def wait_for_work(batch_id, seconds, stop=None, react=None):
    """Wait up to ``seconds``, returning early when a child ended: woken by the worker
    that ended it (on SQLite, where every worker is on this machine), else checked every
    ``react`` seconds. ``stop(t)``: the sleep (returns True when the caller must stop,
    e.g. the worker shuts down); returned as is."""
    stop = stop or (lambda t: time.sleep(t))
    react = react or REACT_SECONDS
    deadline = time.monotonic() + seconds
    listener = qbroker.Listener(ENDED) if connection.vendor == "sqlite" else None
    if listener is not None and listener.sock is None:
        listener = None  # no socket: polls as on PostgreSQL
    while time.monotonic() < deadline:
        left = max(0.0, deadline - time.monotonic())
        if listener is not None:
            listener.wait(min(WOKEN_POLL_SECONDS, left))
            if stop(0):
                return True
        elif stop(min(react, left)):
            return True
        if child_ended(batch_id):
            return False
    return False


# drive's passes look at the crash cases (_rescue_children: lost messages after 15 s,
# stale heartbeats after 10 s, held children) at most this often.
RESCUE_SECONDS = 1.0


def drive(batch_id, *, timeout=None, every=1.0, on_tick=None):
    """Pass over the batch every ``every`` seconds and at once when a child ends, until
    it is final (or ``timeout``). Used by `manage.py evacuate --wait` / `batch ID wait`;
    the periodic task may run passes too (the lease keeps them apart).

    Between two child ends a pass has little to do: the worker that ends a child starts
    the next one itself (fleet/limits.successor), and a child's end wakes this loop (a
    datagram on SQLite; within REACT_SECONDS on PostgreSQL: ``wait_for_work``). Passing
    every 0.25 s, with the crash cases looked at in each pass, the scheduler used ~0.8 s
    of CPU in a 6 s evacuation of six VMs two at a time, beside the migrations it waited
    for (benchmarks/evacuate.py --trace)."""
    owner = uuid.uuid4().hex
    deadline = None if timeout is None else time.monotonic() + timeout
    rescued_at = None
    while True:
        rescue = rescued_at is None or time.monotonic() - rescued_at >= RESCUE_SECONDS
        ran = tick(batch_id, owner, rescue=rescue) is not None
        if ran and rescue:
            rescued_at = time.monotonic()
        batch = Batch.objects.get(pk=batch_id)
        if on_tick:
            on_tick(batch)
        if batch.is_final:
            return batch
        if deadline is not None and time.monotonic() > deadline:
            return batch
        if ran:
            wait_for_work(batch_id, every)
        else:
            # Another scheduler holds the lease: an ended child stays "work" until that
            # one passes, so waking at it would spin; wait the whole interval instead.
            time.sleep(every)

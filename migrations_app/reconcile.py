"""Reconcile: jobs whose worker stopped are concluded from what libvirt says.

A job whose heartbeat is older than STALE_SECONDS while it is active goes to
needs_reconcile. Reconciling one asks both hosts where the domain is and whether a
libvirt job still runs on the source: still running (a PEER2PEER migration is driven by
the source libvirtd and survives the worker) → re-attach and keep monitoring; over →
conclude succeeded / failed / cancelled. It never starts a migration: the worst outcome of
a lost worker is a job marked failed with the VM where libvirt left it, never a second
migration.
"""

import logging
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from hosts import hypervisor as hv
from kvmweb.audit.models import AuditEvent
from migrations_app import runner, states
from migrations_app.journal import Journal
from migrations_app.lifecycle import transition
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.services import add_event, enqueue

log = logging.getLogger(__name__)

STALE_SECONDS = 10
# A queued job nobody claimed for this long may have lost its message (a worker killed
# between taking it and claiming the row; the ORM broker would only redeliver after
# `retry`, hours later): queue it again. Duplicates are harmless, the claim lets one in.
REQUEUE_AFTER_SECONDS = 60
REQUEUE_EVERY_SECONDS = 300
LIVE_MODES = (MigrationJob.LIVE, MigrationJob.LIVE_COPY)


def mark_stale(now=None, stale_seconds=STALE_SECONDS):
    """Active jobs without a heartbeat for ``stale_seconds`` -> needs_reconcile."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=stale_seconds)
    marked = []
    stale = MigrationJob.objects.filter(status__in=states.WORKING, heartbeat_at__lt=cutoff)
    for job in stale.only("pk", "status", "heartbeat_at"):
        # Conditional on the heartbeat too: a worker that wrote one meanwhile keeps its job.
        if MigrationJob.objects.filter(pk=job.pk, heartbeat_at__lt=cutoff).exists() and transition(
            job.pk,
            MigrationJob.NEEDS_RECONCILE,
            from_=[job.status],
            event=("heartbeat_stopped", {"at": f"{job.heartbeat_at:%H:%M:%S}"}),
            level="warn",
            audit="migration.reconcile",
            outcome=AuditEvent.SUCCESS,
            details={"from": job.status, "heartbeat_at": job.heartbeat_at.isoformat()},
        ):
            marked.append(job.pk)
    return marked


def requeue_lost(now=None):
    """Queue again the jobs that waited in QUEUED too long (at most every 5 minutes)."""
    now = now or timezone.now()
    requeued = []
    waiting = MigrationJob.objects.filter(
        status=MigrationJob.QUEUED, created_at__lt=now - timedelta(seconds=REQUEUE_AFTER_SECONDS)
    )
    for job in waiting.only("pk"):
        recent = JobEvent.objects.filter(
            job=job, message__startswith="Queued again", at__gt=now - timedelta(seconds=REQUEUE_EVERY_SECONDS)
        )
        if recent.exists():
            continue
        with transaction.atomic():
            add_event(job.pk, "Queued again: no worker had taken it yet (its message may have been lost).")
            enqueue(job)
        requeued.append(job.pk)
    return requeued


def reconcile_jobs(now=None, stale_seconds=STALE_SECONDS):
    """One pass: mark stale jobs, queue lost ones again, then reconcile every job that
    needs it. Returns {job_id: outcome} for the jobs it looked at."""
    mark_stale(now, stale_seconds)
    requeue_lost(now)
    results = {}
    for job_id in MigrationJob.objects.filter(status=MigrationJob.NEEDS_RECONCILE).values_list(
        "pk", flat=True
    ):
        try:
            results[job_id] = reconcile_one(job_id)
        except Exception:  # one job's trouble must not stop the others
            log.exception("reconciling job %s failed", job_id)
            results[job_id] = "error"
    return results


def reconcile_one(job_id):
    """Claim a needs_reconcile job and re-attach to or conclude it."""
    worker = f"reconcile:{runner.worker_name()}"
    claimed = transition(
        job_id,
        MigrationJob.RUNNING,
        from_=[MigrationJob.NEEDS_RECONCILE],
        worker=worker,
        heartbeat_at=timezone.now(),
    )
    if not claimed:
        return None
    job = MigrationJob.objects.select_related("vm", "source", "target").get(pk=job_id)
    run = runner.JobRun(job, worker)
    if job.source is None or job.target is None:
        return runner._finish(run, MigrationJob.FAILED, "A host of this job was removed; cannot reconcile.")
    if job.mode not in LIVE_MODES:
        # Cold and offline: finish forward or roll back from the journal.
        try:
            return runner.settle(run, Journal.load(job.pk))
        except runner.Unsettled as exc:
            return _release(run, f"{exc}; will retry.")
        except runner.Failed as exc:
            return runner._finish(run, MigrationJob.FAILED, str(exc))
    where = runner.where_is(job)
    if where.get("source_job") in ("bounded", "unbounded"):
        run.event(("reattached", {}))
        try:
            mon = hv.connect(job.source.uri)
        except hv.HypervisorError:
            return _release(run, "Cannot reach the source host to re-attach; will retry.")
        try:
            runner._monitor(run, mon, None)
        except runner.Failed as exc:
            return _release(run, str(exc))
        finally:
            mon.close()
        where = runner.where_is(job)
    return _conclude(run, where)


def _release(run, why):
    """Could not decide now: back to needs_reconcile for the next pass."""
    transition(
        run.job_id,
        MigrationJob.NEEDS_RECONCILE,
        from_=[MigrationJob.RUNNING],
        event=why,
        level="warn",
    )
    return "retry"


def _conclude(run, where):
    """A live job after its worker died: libvirt's view decides."""
    job = run.job
    src, dst = where.get("source"), where.get("target")
    if "unreachable" in (src, dst):
        side = job.source_name if src == "unreachable" else job.target_name
        return _release(run, f"Cannot reach {side} to find out where the VM is; will retry.")
    src_words, dst_words = runner._state_words(src), runner._state_words(dst)
    if dst is not None and dst[0] == "running" and (src is None or src[0] == "shutoff"):
        if src is not None:
            run.event(f"A shut-off definition is still on {job.source_name}.", "warn")
        run.event(f"libvirt says the VM is {dst_words} on {job.target_name}: the migration completed.")
        runner._conclude_success(run)
        return MigrationJob.SUCCEEDED
    if src is not None and dst is None:
        if job.cancel_requested:
            return runner._finish(
                run, MigrationJob.CANCELLED, f"Cancelled; the VM is {src_words} on {job.source_name}."
            )
        return runner._finish(
            run,
            MigrationJob.FAILED,
            f"The worker stopped during the job and libvirt did not complete the migration; the VM is "
            f"{src_words} on {job.source_name}. Nothing was retried.",
        )
    if src is None and dst is None:
        return runner._finish(
            run, MigrationJob.FAILED, f"The VM is on neither {job.source_name} nor {job.target_name}."
        )
    return runner._finish(
        run,
        MigrationJob.FAILED,
        f"The VM is {src_words} on {job.source_name} and {dst_words} on {job.target_name}: check which copy "
        "is the real one before starting anything.",
    )

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

from kvmweb.audit.models import AuditEvent
from migrations_app import modes, states, windows
from migrations_app.jobrun import JobRun, finish, worker_name
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
# The migrations cluster's own, prompter pass (migrations_app/tasks.watch_lost, in each
# idle migrations worker): a job queued and unclaimed, with no log line for this long while
# a worker of the cluster sits idle, lost its message (an idle worker takes a live one
# within the broker's poll). Sent again at most once a minute per job.
LOST_AFTER_SECONDS = 15
LOST_REPEAT_SECONDS = 60
LOST_CHECK_SECONDS = 5


def mark_stale(now=None, stale_seconds=STALE_SECONDS, job_ids=None):
    """Active jobs without a heartbeat for ``stale_seconds`` -> needs_reconcile (only
    ``job_ids`` when given)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=stale_seconds)
    marked = []
    stale = MigrationJob.objects.filter(status__in=states.WORKING, heartbeat_at__lt=cutoff)
    if job_ids is not None:
        stale = stale.filter(pk__in=job_ids)
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


def requeue_lost(now=None, jobs=None, after=REQUEUE_AFTER_SECONDS, every=None):
    """Queue again the queued jobs that no worker has taken for ``after`` seconds since
    they were last queued, and at most once every ``every`` seconds (default ``after``).
    ``jobs`` limits it to some jobs (fleet/scheduler.py: a batch's own children, at a
    shorter interval). Returns the ids queued again.

    A message can be lost: a worker killed after it took the message but before its claim
    (django-q's ORM broker redelivers a locked message only after ``retry``), or a process
    killed between the job's commit and its on-commit message. A duplicate message is
    harmless: the claim is one conditional UPDATE, so one worker wins."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=after)
    every = after if every is None else every
    requeued = []
    waiting = (MigrationJob.objects if jobs is None else jobs).filter(
        status=MigrationJob.QUEUED, created_at__lt=cutoff, waiting_for=""
    )  # held on purpose (windows.py): release_due queues them
    again = now - timedelta(seconds=every)

    def recently_sent(job_id):
        # Queued since the cutoff (approved, released from a hold, queued again): each of
        # these writes a job-log line as it sends a fresh message, so the job's worker has
        # not had ``after`` seconds yet (created_at alone would send a duplicate at once).
        return (
            JobEvent.objects.filter(job_id=job_id, at__gte=cutoff).exists()
            or JobEvent.objects.filter(
                job_id=job_id, message__startswith="Queued again", at__gt=again
            ).exists()
        )

    for job in waiting.only("pk"):
        if recently_sent(job.pk):
            continue
        with transaction.atomic():
            # Several processes run this (every idle migrations worker, the default
            # cluster's reconcile, the batch scheduler): the row lock (PostgreSQL; SQLite's
            # IMMEDIATE transactions serialize writers anyway) and the second look at the
            # log make one of them send the message, not each.
            locked = MigrationJob.objects.select_for_update().filter(pk=job.pk, status=MigrationJob.QUEUED)
            if not list(locked.values_list("pk", flat=True)) or recently_sent(job.pk):
                continue  # claimed, or queued again by another process, meanwhile
            add_event(
                job.pk,
                f"Queued again: no worker had taken it for {after:.0f} s (its message may have been lost).",
            )
            enqueue(job)
        requeued.append(job.pk)
    return requeued


def reconcile_jobs(now=None, stale_seconds=STALE_SECONDS, job_ids=None):
    """One pass: mark stale jobs, queue the held jobs that are due (and end those whose
    window closed: windows.release_due), queue lost ones again, then reconcile every job that
    needs it. Returns {job_id: outcome} for the jobs it looked at.

    With ``job_ids``, only those jobs are marked and reconciled (nothing is released or
    queued again): an operator who knows a job's worker is dead can conclude it at once
    with a stale age of 0 without touching jobs whose workers are alive but between two
    heartbeats."""
    mark_stale(now, stale_seconds, job_ids)
    if job_ids is None:
        windows.release_due(now)
        requeue_lost(now, every=REQUEUE_EVERY_SECONDS)
    results = {}
    waiting = MigrationJob.objects.filter(status=MigrationJob.NEEDS_RECONCILE)
    if job_ids is not None:
        waiting = waiting.filter(pk__in=job_ids)
    for job_id in waiting.values_list("pk", flat=True):
        try:
            results[job_id] = reconcile_one(job_id)
        except Exception:  # one job's trouble must not stop the others
            log.exception("reconciling job %s failed", job_id)
            results[job_id] = "error"
    return results


def reconcile_one(job_id):
    """Claim a needs_reconcile job and let its mode re-attach to or conclude it."""
    worker = f"reconcile:{worker_name()}"
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
    run = JobRun(job, worker)
    if job.source is None or job.target is None:
        return finish(run, MigrationJob.FAILED, [("err_host_removed_reconcile", {})])
    return modes.get(job.mode).reconcile(run)

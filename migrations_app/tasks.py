"""django-q2 entry points of the migrations app.

``run_migration`` runs on the dedicated "migrations" cluster (Q_CLUSTER_NAME=migrations:
one attempt, retry above the longest migration); the message carries only the job id and
the runner's conditional claim makes a second delivery do nothing.
``reconcile_watch`` runs on the default cluster from a schedule: it checks for stale
heartbeats every few seconds for about a minute (django-q2 schedules have minute
granularity, so each run covers the minute until the next).
``watch_lost`` runs in a thread of each migrations worker (migrations_app/apps.py): while
the worker is idle it queues again the jobs whose message was lost, within seconds and
without the default cluster.
"""

import logging
import random
import time

from django.db import connection

from kvmweb import workers
from migrations_app import jobrun, reconcile, runner
from migrations_app.models import MigrationJob

log = logging.getLogger(__name__)
# Migrations this worker process runs now (run_migration runs in its main thread).
_running = 0


def run_migration(job_id):
    """Run one migration job (the worker's whole code path)."""
    global _running
    _running += 1
    try:
        return runner.run_job(job_id)
    finally:
        _running -= 1


def requeue_lost_if_idle():
    """One pass of ``watch_lost``: the ids queued again, or None when this worker is busy
    (a job may then wait for a free worker, not for a lost message)."""
    if _running:
        return None
    try:
        return reconcile.requeue_lost(after=reconcile.LOST_AFTER_SECONDS, every=reconcile.LOST_REPEAT_SECONDS)
    finally:
        if not connection.in_atomic_block:
            connection.close()  # this thread's own connection: not held between passes


def watch_lost(check=reconcile.LOST_CHECK_SECONDS):
    """Until the cluster stops: every ``check`` seconds (jittered, so the workers of a
    cluster do not look at once), ``requeue_lost_if_idle``. A job whose message a killed
    worker took (the ORM broker would redeliver it only after the cluster's ``retry``,
    hours) is queued again about ``LOST_AFTER_SECONDS`` after its last log line, by the
    migrations cluster itself; a duplicate message is harmless (the claim is one
    conditional UPDATE) and one job is sent again at most once a minute.

    Call ``workers.cluster_stop_event()`` in the worker's main thread before starting it:
    the stop event is found on that thread's stack."""
    while not workers.wait(check * random.uniform(0.5, 1.5)):
        try:
            requeue_lost_if_idle()
        except Exception:  # one failed pass (database busy) must not end the watch
            log.exception("looking for lost migration messages failed")


def sync_hosts_after_job(job_id):
    """Both hosts' full inventory sync after a job that ran in `migrate_vm --wait`'s own
    process (migrations_app/jobrun.py queue_sync)."""
    job = MigrationJob.objects.filter(pk=job_id).first()
    if job is not None:
        jobrun.sync_after(job)


def reconcile_jobs():
    """One reconcile pass (also run when a migrations worker starts)."""
    return reconcile.reconcile_jobs()


def reconcile_watch(duration=55.0, every=3.0):
    """Reconcile every ``every`` seconds for ``duration`` seconds."""
    deadline = time.monotonic() + duration
    results = []
    while True:
        results.append(reconcile.reconcile_jobs())
        if time.monotonic() + every > deadline:
            return [r for r in results if r]
        if workers.wait(every):  # the cluster is stopping: end now (kvmweb/workers.py)
            return [r for r in results if r]

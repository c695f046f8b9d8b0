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

from django.conf import settings
from django.db import connection
from django_q.conf import Conf

from kvmweb import qbroker, workers
from migrations_app import jobrun, reconcile, runner, windows
from migrations_app.models import MigrationJob

log = logging.getLogger(__name__)
# Migrations this worker process runs now (run_migration runs in its main thread).
_running = 0

# A worker that ended a job runs the next one a gate names (windows.successor: a batch
# child created ahead, waiting for the slot this job freed) in the same task, without a
# queue round trip; only within this long of the task's start (and a tenth of the task
# timeout, KVMWEB_MIGRATION_TIMEOUT, when that is shorter), so a chained migration keeps
# nearly the whole task timeout. Later, the batch scheduler's pass releases it.
CHAIN_SECONDS = 600


def chain_seconds():
    return min(CHAIN_SECONDS, settings.MIGRATION_TIMEOUT / 10)


def run_migration(job_id):
    """Run one migration job (the worker's whole code path), then the jobs a freed slot
    lets start (windows.successor; each through run_job's own claim). A job a successor
    may follow (windows.chains: a batch child) has its two hosts' full inventory sync
    queued as a task of its own (jobrun.queue_sync, as `migrate_vm --wait` does; another
    worker runs it) instead of run here before the next child could start (the moved
    VM's row is applied before the job ends)."""
    # In a worker of the migrations cluster, marked busy while it runs: its pusher takes
    # a task only for a free worker (kvmweb/qbroker.py ONE_PER_WORKER).
    with qbroker.working(Conf.CLUSTER_NAME):
        return _run_migration(job_id)


def _run_migration(job_id):
    """run_migration's body."""
    global _running
    _running += 1
    try:
        started = time.monotonic()

        def chaining():
            # Not once the cluster is asked to stop (a restart): django-q2 waits for this
            # task, and a chained migration would hold the restart for its whole length.
            return time.monotonic() - started < chain_seconds() and not workers.stopping()

        first, chains = job_id, windows.chains(job_id)
        # A chaining worker re-checks the child it expects to run next, and concludes a
        # live child, while it claims that next child (runner.Lookahead): the landed
        # child's conclusion runs in a thread, waited for before the task ends.
        ahead = runner.Lookahead(job_id, chaining) if chains else None
        started_ahead = [ahead]
        try:
            status = runner.run_job(job_id, defer_sync=chains, lookahead=ahead)
            ran, misses = status is not None, 0
            while ran and misses < 3 and chaining():
                following = windows.successor(job_id)
                if following is None:
                    break
                previous, ahead = ahead, runner.Lookahead(following, chaining)
                started_ahead.append(ahead)
                status_next = runner.run_job(
                    following, defer_sync=windows.chains(following), ahead_of_it=previous, lookahead=ahead
                )
                if previous is not None:  # its conclusion waited for this child's start
                    previous.next_moving()
                if status_next is None:
                    misses += 1  # another worker claimed it first (or a gate held it): the next one
                    ahead = None
                else:
                    job_id = following
        finally:
            for each in started_ahead:
                if each is not None:
                    each.concluded()
        if started_ahead[0] is not None and started_ahead[0].concluding is not None:
            status = MigrationJob.objects.filter(pk=first).values_list("status", flat=True).first()
        return status
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

import threading

from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "Migrations"

    def ready(self):
        from django_q.signals import post_spawn

        from hosts import busy

        post_spawn.connect(_reconcile_at_worker_start, dispatch_uid="kvmweb-reconcile-at-start")
        post_spawn.connect(_schedule_at_worker_start, dispatch_uid="kvmweb-schedule-at-start")
        busy.register(_active_jobs)


def _active_jobs(waiting):
    """hosts.busy's provider: jobs under way (without those waiting for approval unless
    ``waiting``)."""
    from migrations_app.models import MigrationJob

    jobs = MigrationJob.objects.active()
    return jobs if waiting else jobs.exclude(status=MigrationJob.PENDING_APPROVAL)


def _reconcile_at_worker_start(sender, proc_name=None, **kwargs):
    """A migrations worker that starts (e.g. after a crash) first reconciles jobs whose
    worker died and, while it lives, looks for jobs whose queue message was lost
    (tasks.watch_lost). In a thread: the worker must not wait for slow hosts before serving."""
    from django_q.conf import Conf

    if Conf.CLUSTER_NAME != "migrations":
        return
    # Warm the worker: import what a migration task needs and start libvirt's event loop
    # now, so the first job of each forked worker does not pay ~100 ms of imports.
    from hosts import hypervisor
    from migrations_app import plan, preflight, runner, tasks  # noqa: F401

    hypervisor.ensure_event_loop()
    from kvmweb import workers

    workers.cluster_stop_event()  # found on this (main) thread's stack; watch_lost waits on it

    def run():
        from migrations_app.reconcile import reconcile_jobs

        try:
            reconcile_jobs()
        except Exception:  # logged; the scheduled pass will try again
            import logging

            logging.getLogger(__name__).exception("reconcile at worker start failed")

    threading.Thread(target=run, name="reconcile-at-start", daemon=True).start()
    # Its own thread: the start-up pass may follow a re-attached migration to its end.
    threading.Thread(target=tasks.watch_lost, name="watch-lost", daemon=True).start()


def _schedule_at_worker_start(sender, proc_name=None, **kwargs):
    """A default-cluster worker that starts runs django-q2's scheduler pass once: the
    cluster's own first pass comes 30 s after its start (its guard loop counts to 30), so
    after every restart the due watch loops (notifications' dispatcher, the batches' pass,
    the periodic reconcile and host sync) started up to 30 s late, and a webhook for a job
    that ended meanwhile waited that long. Each of the cluster's workers runs it: the pass
    takes the due schedules under a row lock (SQLite: a write transaction) and moves their
    next run before it commits, so a second pass finds nothing left to queue. In a thread:
    the worker serves its queue meanwhile (returned, for tests)."""
    from django_q.conf import Conf

    if Conf.CLUSTER_NAME != Conf.PREFIX or not Conf.SCHEDULER:
        return None

    def run():
        from django.db import connections
        from django_q.scheduler import scheduler

        try:
            scheduler()
        except Exception:  # logged; the guard's own pass follows within 30 s
            import logging

            logging.getLogger(__name__).exception("scheduler pass at worker start failed")
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name="schedule-at-start", daemon=True)
    thread.start()
    return thread

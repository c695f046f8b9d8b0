import threading

from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "Migrations"

    def ready(self):
        from django_q.signals import post_spawn

        from hosts import busy

        post_spawn.connect(_reconcile_at_worker_start, dispatch_uid="kvmweb-reconcile-at-start")
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

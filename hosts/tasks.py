"""Background tasks of the hosts app (run by the default django-q2 cluster)."""

from hosts import services


def sync_all_hosts():
    """Periodic inventory sync of every host; returns a per-host summary."""
    return services.do_sync_all()

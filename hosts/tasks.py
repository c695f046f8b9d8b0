"""Background tasks of the hosts app (run by the default django-q2 cluster)."""

from hosts import services


def sync_all_hosts():
    """Periodic inventory sync of every host; returns a per-host summary. Also sweeps the
    certificate bundles staged for hosts that were never added."""
    services.do_sweep_staged_certificates()
    return services.do_sync_all()

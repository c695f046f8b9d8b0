"""Scope helpers shared by several models' restrict() methods."""


def self_service_target_hosts(user):
    """Hosts a self-service user may pick as migration targets (by policy).

    Returns a queryset of Host primary keys. Until policies are configured, none.
    """
    from hosts.models import Host

    return Host.objects.none().values("pk")

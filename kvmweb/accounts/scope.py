"""Scope helpers shared by several models' restrict() methods."""


def self_service_target_hosts(user):
    """Hosts a self-service user may pick as migration targets (by policy).

    Returns a subquery of Host primary keys: the hosts of every target group allowed by
    the policies that cover the host groups where the user's (not gone) VMs run now. One
    SQL subquery, so a host list stays one query however many VMs the user owns.
    """
    from hosts.models import VM, Host
    from kvmweb.accounts.models import SelfServicePolicy

    source_groups = (
        VM.objects.restrict(user).filter(gone=False, host__group__isnull=False).values("host__group")
    )
    target_groups = SelfServicePolicy.objects.filter(source_group__in=source_groups).values("target_groups")
    return Host.objects.filter(group__in=target_groups).values("pk")


def host_groups(user, action="view"):
    """Scope rule for host groups (HostGroup has no queryset of its own): the staff roles
    see every group; self-service users and outsiders none (they never need the group
    pages; the policy reason names their allowed target groups as text)."""
    from hosts.models import HostGroup
    from kvmweb.accounts.roles import sees_everything

    if not user.is_authenticated or not sees_everything(user):
        return HostGroup.objects.none()
    return HostGroup.objects.all()


def users(user, action="view"):
    """Scope rule for user accounts (the auth User model has no queryset of our own):
    the staff roles see every account; anyone else only their own."""
    from django.contrib.auth import get_user_model

    from kvmweb.accounts.roles import sees_everything

    User = get_user_model()
    if not user.is_authenticated:
        return User.objects.none()
    if sees_everything(user):
        return User.objects.all()
    return User.objects.filter(pk=user.pk)

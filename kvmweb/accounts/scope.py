"""Scope actions and the scope rule of user accounts. Imports no kvmweb app: every
model's ``restrict(user, action)`` (hosts, migrations, audit, fleet, api) builds on it.

``restrict(user, action)`` answers "which rows may this user act on with ``action``"; the
capability itself (a model permission) is checked afterwards by kvmweb.access, so out of
scope is a 404 and in scope without the permission a 403. ``check_action`` refuses an
action nobody defined, so a misspelt action fails loudly instead of falling back to
"view". Adding an action: name it in ACTIONS and say in the models' restrict() what it
narrows, if anything.
"""

from django.contrib.auth import get_user_model

from kvmweb.accounts.roles import sees_everything

ACTIONS = frozenset(
    {
        "view",  # see it (lists, pages, sockets)
        "change",  # edit it (ownership, host groups, policies)
        "delete",
        "migrate",  # move a VM / pick a host as a migration target
        "power",  # start, shut down, force off, reboot a VM
        "sync",  # probe a host, sync its inventory
        "maintain",  # host maintenance and evacuation
        "control",  # a running job's controls (bandwidth, downtime, post-copy)
        "cancel",  # cancel a job
        "approve",  # approve or reject a waiting request
    }
)


def check_action(action):
    """``action`` if it is a known scope action, else ValueError (a programming error)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown scope action {action!r}; known: {', '.join(sorted(ACTIONS))}")
    return action


def users(user, action="view"):
    """Scope rule for user accounts (the auth User model has no queryset of our own):
    the staff roles see every account; anyone else only their own."""
    check_action(action)
    User = get_user_model()
    if not user.is_authenticated:
        return User.objects.none()
    if sees_everything(user):
        return User.objects.all()
    return User.objects.filter(pk=user.pk)

"""The one access helper every view, command and consumer uses.

Scope first (the model's ``restrict(user, action)``): an object outside the user's scope
is a 404, so nobody learns it exists. Then the capability (a model permission): in scope
but not allowed is a 403.
"""

from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404


def scoped(model, user, action="view"):
    """The queryset of ``model`` objects ``user`` may see for ``action``."""
    return model.objects.restrict(user, action)


def get_scoped_or_404(model, user, action="view", perm=None, **lookup):
    """Fetch one object within the user's scope (else 404), then check ``perm`` (else 403)."""
    obj = get_object_or_404(scoped(model, user, action), **lookup)
    require(user, perm)
    return obj


def require(user, perm):
    """Raise PermissionDenied unless the user has the permission (None: no check)."""
    if perm and not user.has_perm(perm):
        raise PermissionDenied

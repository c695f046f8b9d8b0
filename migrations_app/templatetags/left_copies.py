"""The VM page's list of disk copies kvmweb left behind on other hosts."""

from django import template

from kvmweb.access import scoped
from migrations_app.models import LeftCopy

register = template.Library()


@register.inclusion_tag("migrations_app/partials/left_copies.html", takes_context=True)
def vm_left_copies(context, vm):
    """Copies of ``vm``'s disks still on hosts it left (staff roles only)."""
    user = context["request"].user
    copies = list(scoped(LeftCopy, user).filter(vm=vm, removed_at=None).select_related("job"))
    return {
        "copies": copies,
        "can_delete": user.has_perm("migrations_app.delete_leftcopy"),
        "csrf_token": context.get("csrf_token"),
    }

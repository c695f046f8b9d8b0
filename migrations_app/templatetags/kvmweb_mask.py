"""{{ host|host_error:user }}: a host's last error as ``user`` may read it (libvirt URIs
are for administrators only; migrations_app/masking.py)."""

from django import template

from migrations_app.masking import HostMask

register = template.Library()


@register.filter
def host_error(host, user):
    return HostMask.for_user(user).host_text(host, host.last_error)

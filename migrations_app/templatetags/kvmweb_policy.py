"""{{ policy|mode_labels }}: the labels of the modes a self-service policy allows (the
host groups page lists the policies)."""

from django import template

from migrations_app import policy as policies

register = template.Library()


@register.filter
def mode_labels(policy):
    return policies.mode_labels(policy)

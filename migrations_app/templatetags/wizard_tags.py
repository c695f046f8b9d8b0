"""Template filters of the migration wizard."""

from django import template

from migrations_app.wizard import option_modes as _option_modes

register = template.Library()


@register.filter
def option_modes(name):
    """The modes that use the option ``name`` (space separated), from the options schema."""
    return _option_modes(name)

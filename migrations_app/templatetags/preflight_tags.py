"""Template filters for the preflight checklist partial."""

import json

from django import template

register = template.Library()


@register.filter
def preflight_details(details):
    """A check's raw facts as readable, indented JSON (key order kept)."""
    return json.dumps(details or {}, indent=2, ensure_ascii=False, default=str)

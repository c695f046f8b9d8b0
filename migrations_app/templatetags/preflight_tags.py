"""Template filters for the preflight checklist partial."""

import json

from django import template

register = template.Library()


@register.filter
def preflight_details(details):
    """A check's raw facts as readable, indented JSON (key order kept)."""
    return json.dumps(details or {}, indent=2, ensure_ascii=False, default=str)


def _status(result):
    return result.get("status") if isinstance(result, dict) else getattr(result, "status", "")


@register.filter
def passing(results):
    """The checks that passed (folded on the page)."""
    return [r for r in results or [] if _status(r) == "pass"]


@register.filter
def not_passing(results):
    """Warnings, failures and skips (kept open on the page)."""
    return [r for r in results or [] if _status(r) != "pass"]

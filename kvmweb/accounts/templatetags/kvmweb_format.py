"""Site-wide display filters, loaded as template builtins (settings.TEMPLATES).

- ``bytes``: binary units (KiB, MiB, GiB, TiB: powers of 1024, the units libvirt and the
  logs use). ``{{ vm.memory|bytes }}``; a value held in another unit names it:
  ``{{ mib_value|bytes:"MiB" }}``.
- ``when``: a time as local time with its zone, the exact UTC time on hover (title) and a
  machine-readable ``<time datetime>``. ``{{ at|when }}`` (seconds), ``{{ at|when:"short" }}``
  (minutes, for lists), ``{{ at|when:"ago" }}`` ("3 min ago", the local time on hover).
"""

from datetime import UTC, datetime

from django import template
from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.html import format_html
from django.utils.timesince import timesince, timeuntil
from django.utils.translation import gettext as _

register = template.Library()

UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


def binary_size(value, unit="B"):
    """``1536, "MiB"`` -> ``"1.5 GiB"``; None or "" -> ``"—"``."""
    if value is None or value == "":
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    index = UNITS.index(unit) if unit in UNITS else 0
    sign = "-" if number < 0 else ""
    number = abs(number)
    while number >= 1024 and index < len(UNITS) - 1:
        number /= 1024
        index += 1
    if index == 0 or number >= 100 or number == int(number):
        text = f"{number:.0f}"
    else:
        text = f"{number:.1f}"
    return f"{sign}{text} {UNITS[index]}"


@register.filter(name="bytes")
def bytes_filter(value, unit="B"):
    return binary_size(value, unit or "B")


def _as_datetime(value):
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    if timezone.is_naive(value):
        value = timezone.make_aware(value, UTC)
    return value


def relative(value, now=None):
    """Relative time in one unit, translated: "3 minutes ago", "in 2 hours"."""
    now = now or timezone.now()
    if abs((now - value).total_seconds()) < 45:
        return _("just now")
    if value <= now:
        return _("%(delta)s ago") % {"delta": timesince(value, now, depth=1)}
    return _("in %(delta)s") % {"delta": timeuntil(value, now, depth=1)}


@register.filter(name="when")
def when(value, style=""):
    value = _as_datetime(value)
    if value is None:
        return "—"
    local = timezone.localtime(value)
    utc = value.astimezone(UTC)
    exact = date_format(utc, "Y-m-d H:i:s") + " UTC"
    stamp = date_format(local, "Y-m-d H:i" if style == "short" else "Y-m-d H:i:s")
    zone = local.tzname() or ""
    if style == "ago":
        return format_html(
            '<time datetime="{}" title="{} {} · {}">{}</time>',
            utc.isoformat(),
            stamp,
            zone,
            exact,
            relative(value),
        )
    return format_html('<time datetime="{}" title="{}">{} {}</time>', utc.isoformat(), exact, stamp, zone)

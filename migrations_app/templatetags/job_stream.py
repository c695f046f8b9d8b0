"""Template helpers for the job page and its live partials (figures people can read)."""

from django import template
from django.template.defaultfilters import filesizeformat
from django.utils.translation import gettext as _

register = template.Library()


@register.filter
def duration(seconds):
    """Seconds as '1 h 02 min', '3 min 05 s' or '12.3 s'; '' when unknown."""
    if seconds is None or seconds == "":
        return ""
    seconds = float(seconds)
    if seconds < 0:
        return ""
    if seconds < 60:
        return _("%(s).1f s") % {"s": seconds}
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return _("%(m)d min %(s)02d s") % {"m": minutes, "s": secs}
    hours, minutes = divmod(minutes, 60)
    return _("%(h)d h %(m)02d min") % {"h": hours, "m": minutes}


@register.filter
def ms_duration(ms):
    """Milliseconds as a duration (see ``duration``); '' when unknown."""
    if ms is None or ms == "":
        return ""
    return duration(float(ms) / 1000)


@register.filter
def rate(bytes_per_second):
    """Bytes per second as '12.3 MB/s' (same units as filesizeformat)."""
    return _("%(size)s/s") % {"size": filesizeformat(bytes_per_second or 0)}


@register.filter
def epoch(when):
    """A datetime as seconds since the epoch with fractions, for the chart's clock."""
    return f"{when.timestamp():.3f}" if when else ""


@register.simple_tag
def job_virsh(job):
    """The equivalent virsh command line(s) of a job's plan; '' when it cannot be
    rebuilt (its source or target host was removed since)."""
    from migrations_app.plan import MigrationPlan

    mask = getattr(job, "host_mask", None)  # a MaskedJob (migrations_app/masking.py)
    if mask is not None:
        return mask.text(job_virsh(job._obj), job._obj)
    if job.source is not None and job.target is not None:
        try:
            return MigrationPlan.from_job(job).virsh_command()
        except Exception:  # a plan that no longer validates still has a stored copy
            pass
    stored = (job.preflight or {}).get("plan") or {}
    return stored.get("virsh", "") if isinstance(stored, dict) else ""

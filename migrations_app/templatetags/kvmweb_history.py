"""{% vm_history vm %}: a VM's history (location trail, its jobs, the audit events on it
and its jobs), each part filtered by the viewer's scope."""

from django import template
from django.db.models import Q
from django.urls import NoReverseMatch, reverse

from kvmweb.access import scoped
from kvmweb.audit.labels import action_label
from kvmweb.audit.models import AuditEvent
from migrations_app.masking import HostMask
from migrations_app.models import MigrationJob

register = template.Library()

# The job page's URL name is the migrations app's; try the names it may use.
JOB_URL_NAMES = ("migrations:job_detail", "migrations:detail", "migrations:job")
LIMIT = 100


def job_url(job_id):
    for name in JOB_URL_NAMES:
        try:
            return reverse(name, kwargs={"pk": job_id})
        except NoReverseMatch:
            continue
    return ""


def vm_events(user, vm, job_ids):
    """Audit events about the VM itself or any of its jobs, within the user's scope."""
    about = Q(target_type="hosts.vm", target_id=str(vm.pk))
    if job_ids:
        about |= Q(target_type="migrations_app.migrationjob", target_id__in=[str(i) for i in job_ids])
    return scoped(AuditEvent, user).filter(about).order_by("-id")


@register.inclusion_tag("migrations_app/partials/vm_history.html", takes_context=True)
def vm_history(context, vm):
    user = context["request"].user
    # A VM's past may name hosts outside the viewer's scope (it ran there before it became
    # theirs): those names are shown as "another host", never as themselves.
    mask = HostMask.for_user(user)
    host_name = mask.host_name

    jobs = mask.jobs(scoped(MigrationJob, user).filter(vm=vm).order_by("-created_at", "-id")[:LIMIT])
    for job in jobs:
        job.url = job_url(job.pk)
        job.source_shown, job.target_shown = job.source_name, job.target_name
    job_ids = list(scoped(MigrationJob, user).filter(vm=vm).values_list("pk", flat=True))
    events = list(vm_events(user, vm, job_ids)[:LIMIT])
    for event in events:
        event.action_label = action_label(event)
    locations = list(vm.locations.all()[:LIMIT])
    for loc in locations:
        loc.host_shown = host_name(loc.host_name)
    timeline = [{"at": loc.at, "kind": "location", "location": loc} for loc in locations] + [
        {"at": event.at, "kind": "event", "event": event} for event in events
    ]
    timeline.sort(key=lambda entry: entry["at"], reverse=True)
    return {
        "vm": vm,
        "jobs": jobs,
        "timeline": timeline[:LIMIT],
        "can_read_audit": user.has_perm("audit.view_auditevent"),
        "can_change_owner": user.has_perm("hosts.change_vm"),
    }

"""Which object an audit event is about, for people: "Migration job #5 of demo-web", with
a link only when the viewer may open it (``describe``). Part of the audit pages: it reads
hosts, VMs, jobs and users, so it sits above them (the action labels are in labels.py).

The stored event keeps its codes (``migrations_app.migrationjob``, ``5``): they are what
the chain hashes and what exports carry. Labels are for people.
"""

import re

from django.urls import reverse
from django.utils.translation import gettext_lazy as _

from hosts.models import VM, Host, HostGroup
from kvmweb.access import scoped
from kvmweb.accounts.scope import users
from kvmweb.audit.labels import action_label
from migrations_app.models import MigrationJob

JOB_NAME = re.compile(r"^#\d+ (?P<vm>\S+)")


def _job_label(event, job):
    vm = job.vm_name if job is not None else None
    if vm is None:
        match = JOB_NAME.match(event.target_name or "")
        vm = match["vm"] if match else event.target_name
    return _("Migration job #%(id)s of %(vm)s") % {"id": event.target_id, "vm": vm}


def _visible(model, user, ids, **extra):
    return {obj.pk: obj for obj in scoped(model, user).filter(pk__in=ids, **extra)}


def describe(events, user):
    """Give each event ``action_label``, ``object_label`` and ``object_url`` (None unless
    the viewer may open the object). One query per object type on the page (at most
    four), whatever the number of events."""
    events = list(events)
    ids = {}
    for event in events:
        if event.target_id.isdigit():
            ids.setdefault(event.target_type, set()).add(int(event.target_id))
    seen = {}
    if ids.get("hosts.vm"):
        seen["hosts.vm"] = _visible(VM, user, ids["hosts.vm"])
    if ids.get("hosts.host"):
        seen["hosts.host"] = _visible(Host, user, ids["hosts.host"])
    if ids.get("migrations_app.migrationjob"):
        seen["migrations_app.migrationjob"] = _visible(MigrationJob, user, ids["migrations_app.migrationjob"])
    if ids.get("auth.user") and user.has_perm("auth.change_user"):
        found = users(user).filter(pk__in=ids["auth.user"])
        seen["auth.user"] = {u.pk: u for u in found}
    group_events = ids.get("hosts.hostgroup") or ids.get("accounts.selfservicepolicy")
    may_see_groups = bool(group_events) and HostGroup.objects.restrict(user).exists()
    routes = {
        "hosts.vm": "hosts:vm_detail",
        "hosts.host": "hosts:detail",
        "migrations_app.migrationjob": "migrations:detail",
        "auth.user": "accounts:user_roles",
    }
    for event in events:
        kind, name = event.target_type, event.target_name
        pk = int(event.target_id) if event.target_id.isdigit() else None
        obj = seen.get(kind, {}).get(pk)
        event.action_label = action_label(event)
        event.object_url = reverse(routes[kind], args=[pk]) if obj is not None and kind in routes else None
        if kind == "hosts.vm":
            event.object_label = _("VM %(name)s") % {"name": name}
        elif kind == "hosts.host":
            event.object_label = _("Host %(name)s") % {"name": name}
        elif kind == "migrations_app.migrationjob":
            event.object_label = _job_label(event, obj)
        elif kind == "auth.user":
            event.object_label = _("User %(name)s") % {"name": name}
        elif kind == "hosts.hostgroup":
            event.object_label = _("Host group %(name)s") % {"name": name}
            event.object_url = reverse("hosts:groups") if may_see_groups else None
        elif kind == "accounts.selfservicepolicy":
            event.object_label = name
            event.object_url = reverse("hosts:groups") if may_see_groups else None
        elif kind == "audit.auditevent":
            event.object_label = _("Audit history")
        elif kind:
            event.object_label = f"{name} ({kind}:{event.target_id})" if name else f"{kind}:{event.target_id}"
        else:
            event.object_label = name
    return events

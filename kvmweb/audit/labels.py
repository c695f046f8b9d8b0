"""Human labels for audit events: what happened ("VM powered"), which object ("Migration
job #5 of demo-web"), and a link to the object only when the viewer may open it.

The stored event keeps its codes (``migration.request``, ``migrations_app.migrationjob``,
``5``): they are what the chain hashes and what exports carry. Labels are for people.
"""

import re

from django.urls import reverse
from django.utils.translation import gettext_lazy as _

ACTIONS = {
    "auth.login": _("Signed in"),
    "auth.logout": _("Signed out"),
    "audit.export": _("Audit history exported"),
    "host.register": _("Host registered"),
    "host.change": _("Host changed"),
    "host.remove": _("Host removed"),
    "host.status": _("Host status changed"),
    "host.ssh_key": _("kvmweb SSH key generated"),
    "inventory.sync": _("Inventory synced"),
    "vm.owner": _("VM owner changed"),
    "vm.power": _("VM power action"),
    "hostgroup.create": _("Host group created"),
    "hostgroup.change": _("Host group changed"),
    "hostgroup.delete": _("Host group deleted"),
    "policy.create": _("Self-service policy created"),
    "policy.change": _("Self-service policy changed"),
    "policy.delete": _("Self-service policy deleted"),
    "user.create": _("User created"),
    "user.roles": _("User roles changed"),
    "migration.request": _("Migration requested"),
    "migration.approve": _("Migration approved"),
    "migration.reject": _("Migration rejected"),
    "migration.cancel": _("Migration cancelled"),
    "migration.finish": _("Migration finished"),
    "migration.bandwidth": _("Migration bandwidth changed"),
    "migration.downtime": _("Migration downtime changed"),
    "migration.postcopy": _("Switched to post-copy"),
    "migration.force_off": _("Forced the guest off (cold move)"),
    "notifications.read": _("Notifications marked read"),
}

POWER = {
    "start": _("VM started"),
    "shutdown": _("VM shut down"),
    "destroy": _("VM forced off"),
    "reboot": _("VM rebooted"),
}

JOB_NAME = re.compile(r"^#\d+ (?P<vm>\S+)")


def action_label(event):
    """What happened, in words; unknown codes are shown as they are."""
    if event.action == "vm.power" and isinstance(event.details, dict):
        label = POWER.get(event.details.get("action"))
        if label:
            return label
    return ACTIONS.get(event.action, event.action)


def _job_label(event, job):
    vm = job.vm_name if job is not None else None
    if vm is None:
        match = JOB_NAME.match(event.target_name or "")
        vm = match["vm"] if match else event.target_name
    return _("Migration job #%(id)s of %(vm)s") % {"id": event.target_id, "vm": vm}


def _visible(model, user, ids, **extra):
    from kvmweb.access import scoped

    return {obj.pk: obj for obj in scoped(model, user).filter(pk__in=ids, **extra)}


def describe(events, user):
    """Give each event ``action_label``, ``object_label`` and ``object_url`` (None unless
    the viewer may open the object). One query per object type on the page (at most
    four), whatever the number of events."""
    from hosts.models import VM, Host
    from kvmweb.accounts.scope import host_groups, users
    from migrations_app.models import MigrationJob

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
    may_see_groups = bool(group_events) and host_groups(user).exists()
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
            event.object_url = reverse("accounts:host_groups") if may_see_groups else None
        elif kind == "accounts.selfservicepolicy":
            event.object_label = name
            event.object_url = reverse("accounts:host_groups") if may_see_groups else None
        elif kind == "audit.auditevent":
            event.object_label = _("Audit history")
        elif kind:
            event.object_label = f"{name} ({kind}:{event.target_id})" if name else f"{kind}:{event.target_id}"
        else:
            event.object_label = name
    return events

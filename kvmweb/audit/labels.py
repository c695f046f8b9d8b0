"""Human labels for audit event actions: what happened ("VM powered"). Which object an
event is about, with a link, is in kvmweb/audit/objects.py (it reads hosts and jobs).

The stored event keeps its codes (``migration.request``, ``migrations_app.migrationjob``,
``5``): they are what the chain hashes and what exports carry. Labels are for people.
"""

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
    "host.ssh_hostkey": _("SSH host key confirmed or replaced"),
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


def action_label(event):
    """What happened, in words; unknown codes are shown as they are."""
    if event.action == "vm.power" and isinstance(event.details, dict):
        label = POWER.get(event.details.get("action"))
        if label:
            return label
    return ACTIONS.get(event.action, event.action)

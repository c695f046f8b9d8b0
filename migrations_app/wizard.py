"""What the migration wizard tells its user before any checklist runs: which modes fit
the VM as it is now (and why the others do not), which mode to preselect, and what to
ask an administrator for when no target is open to a self-service user.

Read-only helpers for migrations_app/views.py; the rules themselves stay where they live
(each mode's ``validate_state``, the self-service policy in migrations_app/policy.py).
"""

from dataclasses import dataclass

from django.utils.translation import gettext as _

from kvmweb.accounts.roles import is_self_service, is_staff_migrator
from migrations_app import modes
from migrations_app.models import MigrationJob
from migrations_app.options import SCHEMA, PlanError
from migrations_app.policy import policy_for


@dataclass(frozen=True)
class ModeChoice:
    """One mode as the wizard offers it: ``fits`` False greys it out, ``why`` says why."""

    key: str
    label: str
    fits: bool
    why: str = ""


def _policy(user, vm):
    if is_staff_migrator(user) or not is_self_service(user):
        return None, False
    return policy_for(vm), True


def mode_choices(user, vm):
    """Every mode with whether it fits ``vm``'s state (as last read) and, for a
    self-service user, whether the policy covering the VM allows it."""
    policy, self_service = _policy(user, vm)
    state = str(vm.get_state_display()) if vm.state else _("in an unknown state")
    out = []
    for key, label in MigrationJob.MODES:
        why = ""
        try:
            modes.get(key).validate_state(vm.name, state, vm.is_running, vm.persistent)
        except PlanError as exc:
            why = str(exc)
        if not why and self_service and policy is not None and key not in (policy.allowed_modes or []):
            why = _("The self-service policy for this VM does not allow this mode.")
        out.append(ModeChoice(key, str(label), not why, why))
    return out


def default_mode(vm):
    """Live for a running VM; Offline (definition only) for one that is not running."""
    return MigrationJob.LIVE if vm.is_running else MigrationJob.OFFLINE


def fitting_mode(choices, wanted, vm):
    """``wanted`` when it fits, else the VM's default when it fits, else the first mode
    that fits, else ``wanted`` (the checklist then says why nothing fits)."""
    fits = [c.key for c in choices if c.fits]
    for key in (wanted, default_mode(vm)):
        if key in fits:
            return key
    return fits[0] if fits else (wanted or default_mode(vm))


def option_modes(name):
    """The modes that use option ``name`` (the options schema), space separated."""
    option = SCHEMA.get(name)
    return " ".join(sorted(option.modes)) if option else ""


def no_target_help(user, vm):
    """What a user who has no target for ``vm`` should ask an administrator for ('' for
    staff: they see every host, so an empty list means there is no other host)."""
    policy, self_service = _policy(user, vm)
    if not self_service:
        return ""
    group = vm.host.group.name if vm.host and vm.host.group_id else ""
    if policy is None:
        if not group:
            return _(
                "%(host)s, where %(vm)s runs, is in no host group, so no self-service policy can cover it. "
                "Ask an administrator to put the host in a group with a self-service policy, or to move the VM for you."
            ) % {"host": vm.host.name, "vm": vm.name}
        return _(
            "No self-service policy covers VMs on hosts of %(group)s. Ask an administrator for one: "
            "which host groups %(vm)s may move to, and which modes you need (e.g. Live, Cold)."
        ) % {"group": group, "vm": vm.name}
    return _(
        "The self-service policy for %(group)s lists no target host that is available now (none in its "
        "target groups, or all in maintenance). Ask an administrator to add a target group to it."
    ) % {"group": group}

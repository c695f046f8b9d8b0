"""May this person ask for this migration? The self-service policy check.

``check_request`` is the one gate every migration request passes (the wizard calls it
before creating a job, the service calls it again inside its transaction). Staff roles
are always allowed; self-service users are held to the policy of the host group their
VM runs in; everyone else is refused.

Reasons are shown to the requester as they are. They name only things the requester can
already see (their VM, its host, their chosen mode and bandwidth, target groups their
policy lists), never a host or VM outside their scope: a target outside the policy gets
the same sentence whether it exists or not.
"""

from dataclasses import dataclass

from django.utils.translation import gettext as _

from hosts.models import VM, Host
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.accounts.roles import is_self_service, is_staff_migrator
from migrations_app.models import MigrationJob
from migrations_app.options import SCHEMA, OptionError, applies


@dataclass(frozen=True)
class Decision:
    """The answer to a migration request: allowed or not, waits for approval or not, and
    a sentence for the requester (empty when allowed without conditions)."""

    allowed: bool
    needs_approval: bool = False
    reason: str = ""

    def __bool__(self):
        return self.allowed


def mode_labels(policy):
    """The labels of the modes ``policy`` allows, in the viewer's language."""
    labels = dict(MigrationJob.MODES)
    return [str(labels.get(mode, mode)) for mode in policy.allowed_modes]


def policy_for(vm):
    """The self-service policy that covers ``vm`` where it runs now, or None."""
    host = vm.host
    if host is None or host.group_id is None:
        return None
    return (
        SelfServicePolicy.objects.filter(source_group_id=host.group_id)
        .prefetch_related("target_groups")
        .first()
    )


def allowed_targets(user, vm):
    """Hosts ``user`` may pick as the target for ``vm`` (a Host queryset).

    Staff: every host except the VM's current one. Self-service: the hosts of the target
    groups of the policy covering the VM's current host group (the VM must be theirs).
    Anyone else: none. Hosts in maintenance are never targets. Use it to fill the
    wizard's target choice.
    """
    if is_staff_migrator(user):
        return Host.objects.exclude(pk=vm.host_id).exclude(maintenance=True)
    if not is_self_service(user) or not VM.objects.restrict(user).filter(pk=vm.pk).exists():
        return Host.objects.none()
    policy = policy_for(vm)
    if policy is None:
        return Host.objects.none()
    return (
        Host.objects.filter(group__in=policy.target_groups.all())
        .exclude(pk=vm.host_id)
        .exclude(maintenance=True)
    )


def _bandwidth(options):
    """The requested cap in MiB/s, None for unlimited (absent, empty or 0, as in libvirt);
    a value the options schema refuses raises OptionError with the schema's words."""
    value = (options or {}).get("bandwidth")
    if value in (None, "", 0, "0"):
        return None
    return SCHEMA["bandwidth"].clean(value)


def refused_options(user, options):
    """Why ``user`` may not even run a checklist with ``options`` ("" when they may).

    An explicit migration URI is an operator's tool: the source connects wherever it
    says, and the checklist's "migration_ports" check measures that address and port
    from the source host and from kvmweb's machine and reports what answered. For
    anyone else that would be a port scanner behind the firewall, so the dry run, the
    wizard and the API refuse it before the checklist runs, with check_request's words."""
    if (options or {}).get("migrate_uri") and not is_staff_migrator(user):
        return _("An explicit migration URI can only be set by an operator.")
    return ""


def check_request(user, vm, target, mode, options=None):
    """Decide whether ``user`` may migrate ``vm`` to ``target`` with ``mode`` and
    ``options`` (options["bandwidth"] in MiB/s; None or 0 = unlimited).

    Returns a Decision. Never raises for a refusal: the caller audits the refusal as a
    failure with the reason and shows the reason.
    """
    if not user.is_authenticated:
        return Decision(False, reason=_("Sign in to request a migration."))
    if target is not None and getattr(target, "maintenance", False):
        return Decision(False, reason=_("That target is in maintenance and accepts no migrations."))
    if is_staff_migrator(user):
        return Decision(True)
    if not is_self_service(user) or not user.has_perm("migrations_app.add_migrationjob"):
        return Decision(False, reason=_("Your role does not allow migration requests."))

    # Same sentence for "not yours" and "does not exist": nothing to learn from it.
    if vm is None or not VM.objects.restrict(user).filter(pk=vm.pk).exists():
        return Decision(False, reason=_("That VM is not available to you."))
    policy = policy_for(vm)
    if policy is None:
        return Decision(
            False,
            reason=_(
                "No self-service policy covers the host this VM runs on, so it can only be "
                "moved by an operator."
            ),
        )
    allowed_group_ids = {g.pk for g in policy.target_groups.all()}
    if target is None or target.group_id not in allowed_group_ids or target.pk == vm.host_id:
        names = ", ".join(sorted(g.name for g in policy.target_groups.all()))
        return Decision(
            False,
            reason=_("That target is not available to you. This VM may move to hosts of: %(groups)s.")
            % {"groups": names or _("no group")},
        )
    if (options or {}).get("migrate_uri"):
        # The source libvirtd would connect wherever the URI says: an operator's tool.
        return Decision(False, reason=_("An explicit migration URI can only be set by an operator."))
    if mode not in policy.allowed_modes:
        return Decision(
            False,
            reason=_("The mode %(mode)s is not allowed for this VM. Allowed: %(allowed)s.")
            % {"mode": mode, "allowed": ", ".join(mode_labels(policy)) or _("none")},
        )
    try:
        bandwidth = _bandwidth(options)
    except OptionError as exc:
        return Decision(False, reason=str(exc))
    # A bandwidth cap limits what uses bandwidth: cold and offline moves copy no memory
    # over the migration stream, so the cap neither applies nor refuses them.
    if policy.max_bandwidth is not None and applies("bandwidth", mode):
        if bandwidth is None:
            return Decision(
                False,
                reason=_("Set a bandwidth limit of at most %(cap)d MiB/s; unlimited is not allowed.")
                % {"cap": policy.max_bandwidth},
            )
        if bandwidth > policy.max_bandwidth:
            return Decision(
                False,
                reason=_("The bandwidth %(asked)d MiB/s is above the allowed %(cap)d MiB/s.")
                % {"asked": bandwidth, "cap": policy.max_bandwidth},
            )
    if policy.requires_approval:
        return Decision(True, True, _("This request waits for an operator's approval."))
    return Decision(True)

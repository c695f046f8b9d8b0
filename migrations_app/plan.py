"""Migration plans: a VM, a target host, a mode and options, and exactly what libvirt will
be asked to do (flags, typed parameters, the equivalent `virsh` command lines).

The modes (docs/architecture.md) are explicit because the runbook's "virsh migrate --persistent is
cold migration" is wrong: PERSIST_DEST only keeps the domain defined on the target.

| mode      | libvirt                                                              |
|-----------|----------------------------------------------------------------------|
| live      | LIVE|PEER2PEER (+PERSIST_DEST, +UNDEFINE_SOURCE by default)           |
| live-copy | live + NON_SHARED_DISK (or NON_SHARED_INC)                           |
| cold      | shutdown, then OFFLINE|PERSIST_DEST|UNDEFINE_SOURCE (+ disk copy)     |
| offline   | OFFLINE|PERSIST_DEST (+UNDEFINE_SOURCE): the definition only         |

This module never imports libvirt: flag values come from hosts.hypervisor.MIGRATE_FLAGS.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from django.utils.translation import gettext as _

from migrations_app import modes, options
from migrations_app.convergence import DEFAULT_MAX_DOWNTIME_MS
from migrations_app.options import DEFAULTS, LIVE_MODES, MODE_KEYS, MODES, SCHEMA, OptionError, PlanError

__all__ = ["DEFAULTS", "LIVE_MODES", "MODE_KEYS", "MODES", "MigrationPlan", "PlanError", "parse_options"]

COMPLETION_ACTIONS = SCHEMA["completion_action"].choices
COPY_STORAGE = SCHEMA["copy_storage"].choices


def parse_options(mode, data=None):
    """Normalize and validate the options of a plan (migrations_app/options.py); a
    refused value is a PlanError with the schema's words. ``start_on_target`` defaults
    to True; plans for a VM that is not running pass False (see MigrationPlan)."""
    try:
        return options.parse(mode, data)
    except OptionError as exc:
        raise PlanError(str(exc)) from None


def _flags():
    from hosts.hypervisor import MIGRATE_FLAGS

    return MIGRATE_FLAGS


def _params():
    from hosts.hypervisor import MIGRATE_PARAMS

    return MIGRATE_PARAMS


@dataclass
class MigrationPlan:
    """What will be done: ``vm`` (hosts.models.VM) moves from ``source`` to ``target``
    (hosts.models.Host) in ``mode`` with normalized ``options`` (see parse_options)."""

    vm: object
    source: object
    target: object
    mode: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        given = dict(self.options or {})
        self.strategy = modes.get(self.mode)
        if self.strategy.shuts_down and "start_on_target" not in given and self.vm is not None:
            # Cold: start on the target only what was running before (unless told).
            given["start_on_target"] = bool(getattr(self.vm, "is_running", True))
        self.options = parse_options(self.mode, given)

    # -- validation -------------------------------------------------------------

    def validate(self, state=None, persistent=None):
        """Refuse combinations libvirt refuses, with the reason (PlanError). ``state``
        and ``persistent`` default to the inventory's view of the VM; preflight passes
        the live values read from the source host."""
        self.validate_options()
        self.validate_state(state, persistent)
        return True

    def validate_state(self, state=None, persistent=None):
        """The VM's state and persistence fit the mode (PlanError otherwise)."""
        state = state or getattr(self.vm, "state", "")
        persistent = getattr(self.vm, "persistent", True) if persistent is None else persistent
        running = state in ("running", "paused", "blocked")
        self.strategy.validate_state(self.vm.name, state, running, persistent)

    def validate_options(self):
        """The options fit together and the target is another host (PlanError otherwise)."""
        opts = self.options
        if self.target is not None and self.source is not None and self.target.pk == self.source.pk:
            raise PlanError(_("The target is the host the VM is already on. Choose another host."))
        if self.strategy.definition_only and not opts.get("persist", True):
            raise PlanError(
                _("Offline migration must keep the VM defined on the target (libvirt requires --persistent).")
            )
        if self.strategy.shuts_down and not opts.get("persist", True):
            raise PlanError(_("Cold migration must define the VM on the target (persistent)."))
        if (
            opts.get("completion_action") == "postcopy"
            and opts.get("completion_timeout")
            and not opts.get("postcopy")
        ):
            raise PlanError(_("Switching to post-copy at the timeout needs post-copy enabled."))
        if opts.get("convergence_policy") == "ladder-postcopy" and not opts.get("postcopy"):
            raise PlanError(_("A convergence policy that ends in post-copy needs post-copy enabled."))
        if opts.get("convergence_policy", "none") != "none":
            top = opts.get("ladder_max_downtime") or DEFAULT_MAX_DOWNTIME_MS
            if opts.get("max_downtime") and top <= opts["max_downtime"]:
                # No step to take: the ladder would end (abort, post-copy) at the first
                # "not converging" verdict.
                raise PlanError(
                    _(
                        "The convergence ladder's highest downtime (%(top)s ms) must be above the "
                        "allowed downtime (%(ms)s ms): raise it, or lower the allowed downtime."
                    )
                    % {"top": top, "ms": opts["max_downtime"]}
                )
        if opts.get("undefine_source") and not opts.get("persist", True):
            raise PlanError(
                _(
                    "Undefining the source without keeping the VM persistent on the target would "
                    "leave no definition anywhere once it shuts down. Keep 'persist on target' on."
                )
            )
        if opts.get("tunnelled") and opts.get("parallel"):
            raise PlanError(_("libvirt cannot combine tunnelled migration with parallel connections."))
        if opts.get("tunnelled") and opts.get("tls"):
            # libvirt 9.0 fails with "failed to convert virJSONValue to yajl data"; the tunnel
            # already rides the (SSH or TLS) libvirt connection.
            raise PlanError(
                _("Native TLS does not apply to a tunnelled migration: its tunnel is already encrypted.")
            )
        if opts.get("tunnelled") and self.strategy.live and self.strategy.copies_disks:
            raise PlanError(_("libvirt cannot copy storage (NBD) through a tunnelled migration."))
        if opts.get("tunnelled") and opts.get("migrate_uri"):
            raise PlanError(_("A tunnelled migration uses the libvirt connection; drop the migration URI."))

    # -- what libvirt gets ----------------------------------------------------------

    def flag_names(self):
        """The VIR_MIGRATE_* flags (by MIGRATE_FLAGS key) of the migrate call. For cold
        mode these are the flags of the definition move after the shutdown."""
        return self.strategy.flag_names(self.options)

    def flags(self):
        """The flag bits for virDomainMigrateToURI3."""
        table = _flags()
        value = 0
        for name in self.flag_names():
            value |= table[name]
        return value

    def params(self):
        """Typed parameters for migrateToURI3 (keys are libvirt's parameter names).

        Not parameters: max downtime (call migrateSetMaxDowntime(ms) once the job runs),
        the completion timeout and its action (kvmweb's runner watches the clock and calls
        abortJob() or migrateStartPostCopy()), and the post-copy switch itself."""
        table = _params()
        opts = self.options
        out = {}
        if not self.strategy.live:
            return out
        if opts.get("bandwidth"):
            out[table["bandwidth"]] = int(opts["bandwidth"])
        if opts.get("parallel"):
            out[table["parallel_connections"]] = int(opts["parallel"])
        if opts.get("migrate_uri"):
            out[table["uri"]] = opts["migrate_uri"]
        return out

    def target_uri(self):
        return self.target.uri

    # -- what a person would type --------------------------------------------------------

    def virsh_command(self):
        """The equivalent `virsh` command line(s), one per line; steps that are not a
        single command are explained in a `#` comment line."""
        q = shlex.quote
        return self.strategy.virsh_command(self, q(self.source.uri), q(self.target.uri), q(self.vm.name))

    def to_dict(self):
        """A JSON-able description (stored with the job and the preflight report)."""
        return {
            "vm": {"id": getattr(self.vm, "pk", None), "uuid": str(self.vm.uuid), "name": self.vm.name},
            "source": {"id": self.source.pk, "name": self.source.name, "uri": self.source.uri},
            "target": {"id": self.target.pk, "name": self.target.name, "uri": self.target.uri},
            "mode": self.mode,
            "options": dict(self.options),
            "flags": self.flags(),
            "flag_names": self.flag_names(),
            "params": self.params(),
            "virsh": self.virsh_command(),
        }

    @classmethod
    def from_job(cls, job):
        """The plan of a MigrationJob row (source, target, mode and stored options)."""
        return cls(
            vm=job.vm, source=job.source, target=job.target, mode=job.mode, options=dict(job.options or {})
        )

    @classmethod
    def for_vm(cls, vm, target, mode, options=None):
        """A plan from the VM's current host to ``target``."""
        return cls(vm=vm, source=vm.host, target=target, mode=mode, options=dict(options or {}))

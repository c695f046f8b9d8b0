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

from migrations_app import options
from migrations_app.options import DEFAULTS, LIVE_MODES, MODE_KEYS, MODES, SCHEMA, OptionError

__all__ = ["DEFAULTS", "LIVE_MODES", "MODE_KEYS", "MODES", "MigrationPlan", "PlanError", "parse_options"]

COMPLETION_ACTIONS = SCHEMA["completion_action"].choices
COPY_STORAGE = SCHEMA["copy_storage"].choices


class PlanError(ValueError):
    """A plan libvirt (or kvmweb) would refuse; the message is meant for people."""


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
        if self.mode == "cold" and "start_on_target" not in given and self.vm is not None:
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
        if self.mode in LIVE_MODES and not running:
            raise PlanError(
                _(
                    "Live migration needs a running VM, and %(vm)s is %(state)s. "
                    "Use Cold or Offline (definition only) for a VM that is not running."
                )
                % {"vm": self.vm.name, "state": state or _("in an unknown state")}
            )
        if self.mode == "offline":
            if running:
                raise PlanError(
                    _(
                        "Offline migration moves only the definition and needs a shut-off VM; "
                        "%(vm)s is %(state)s. Use Live, or Cold (shut down first)."
                    )
                    % {"vm": self.vm.name, "state": state}
                )
            if not persistent:
                raise PlanError(_("A transient VM has no definition to move offline."))
        if self.mode == "cold" and not persistent:
            raise PlanError(
                _("A transient VM disappears when it shuts down, so it cannot be migrated cold. Use Live.")
            )

    def validate_options(self):
        """The options fit together and the target is another host (PlanError otherwise)."""
        opts = self.options
        if self.target is not None and self.source is not None and self.target.pk == self.source.pk:
            raise PlanError(_("The target is the host the VM is already on. Choose another host."))
        if self.mode == "offline" and not opts.get("persist", True):
            raise PlanError(
                _("Offline migration must keep the VM defined on the target (libvirt requires --persistent).")
            )
        if self.mode == "cold" and not opts.get("persist", True):
            raise PlanError(_("Cold migration must define the VM on the target (persistent)."))
        if (
            opts.get("completion_action") == "postcopy"
            and opts.get("completion_timeout")
            and not opts.get("postcopy")
        ):
            raise PlanError(_("Switching to post-copy at the timeout needs post-copy enabled."))
        if opts.get("undefine_source") and not opts.get("persist", True):
            raise PlanError(
                _(
                    "Undefining the source without keeping the VM persistent on the target would "
                    "leave no definition anywhere once it shuts down. Keep 'persist on target' on."
                )
            )
        if opts.get("tunnelled") and opts.get("parallel"):
            raise PlanError(_("libvirt cannot combine tunnelled migration with parallel connections."))
        if opts.get("tunnelled") and self.mode == "live-copy":
            raise PlanError(_("libvirt cannot copy storage (NBD) through a tunnelled migration."))
        if opts.get("tunnelled") and opts.get("migrate_uri"):
            raise PlanError(_("A tunnelled migration uses the libvirt connection; drop the migration URI."))

    # -- what libvirt gets ----------------------------------------------------------

    def flag_names(self):
        """The VIR_MIGRATE_* flags (by MIGRATE_FLAGS key) of the migrate call. For cold
        mode these are the flags of the definition move after the shutdown."""
        opts = self.options
        if self.mode in ("cold", "offline"):
            names = ["offline", "persist_dest"]
            if opts.get("undefine_source", True):
                names.append("undefine_source")
            return names
        names = ["live", "peer2peer"]
        if opts.get("tunnelled"):
            names.append("tunnelled")
        if opts.get("persist", True):
            names.append("persist_dest")
        if opts.get("undefine_source", True):
            names.append("undefine_source")
        if self.mode == "live-copy":
            names.append("non_shared_inc" if opts.get("copy_storage") == "inc" else "non_shared_disk")
        if opts.get("auto_converge"):
            names.append("auto_converge")
        if opts.get("compression"):
            names.append("compressed")
        if opts.get("parallel"):
            names.append("parallel")
        if opts.get("postcopy"):
            names.append("postcopy")
        return names

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
        if self.mode not in LIVE_MODES:
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
        src, dst, name = q(self.source.uri), q(self.target.uri), q(self.vm.name)
        opts = self.options
        if self.mode in LIVE_MODES:
            parts = ["virsh", "-c", src, "migrate", "--live", "--p2p"]
            if opts.get("tunnelled"):
                parts.append("--tunnelled")
            if opts.get("persist", True):
                parts.append("--persistent")
            if opts.get("undefine_source", True):
                parts.append("--undefinesource")
            if self.mode == "live-copy":
                parts.append(
                    "--copy-storage-inc" if opts.get("copy_storage") == "inc" else "--copy-storage-all"
                )
            if opts.get("auto_converge"):
                parts.append("--auto-converge")
            if opts.get("compression"):
                parts.append("--compressed")
            if opts.get("parallel"):
                parts += ["--parallel", "--parallel-connections", str(opts["parallel"])]
            if opts.get("postcopy"):
                parts.append("--postcopy")
            if opts.get("bandwidth"):
                parts += ["--bandwidth", str(opts["bandwidth"])]
            if opts.get("completion_timeout") and opts.get("completion_action") == "postcopy":
                parts += ["--timeout", str(opts["completion_timeout"]), "--timeout-postcopy"]
            if opts.get("migrate_uri"):
                parts += ["--migrateuri", q(opts["migrate_uri"])]
            parts += ["--verbose", name, dst]
            lines = [" ".join(parts)]
            if opts.get("max_downtime"):
                lines.append(
                    f"# while it runs: virsh -c {src} migrate-setmaxdowntime {name} {opts['max_downtime']}"
                )
            if opts.get("completion_timeout") and opts.get("completion_action") == "abort":
                lines.append(
                    f"# after {opts['completion_timeout']} s without completing: virsh -c {src} domjobabort {name}"
                )
            if opts.get("postcopy"):
                lines.append(f"# to switch to post-copy: virsh -c {src} migrate-postcopy {name}")
            return "\n".join(lines)
        offline = ["virsh", "-c", src, "migrate", "--offline", "--persistent"]
        if opts.get("undefine_source", True):
            offline.append("--undefinesource")
        offline += [name, dst]
        if self.mode == "offline":
            return " ".join(offline)
        timeout = opts.get("shutdown_timeout", 120)
        lines = [
            f"virsh -c {src} shutdown {name}",
            f"# wait up to {timeout} s until `virsh -c {src} domstate {name}` says shut off"
            + (f", else: virsh -c {src} destroy {name}" if opts.get("force_off") else ", else give up"),
        ]
        for disk in getattr(self.vm, "disks", None) or []:
            path = disk.get("source") if isinstance(disk, dict) else ""
            if path and disk.get("device", "disk") == "disk":
                qp = q(path)
                lines.append(
                    f"# disk not on shared storage only: virsh -c {src} vol-download {qp} /tmp/disk.img && "
                    f"virsh -c {dst} vol-upload {qp} /tmp/disk.img  (after vol-create on the target)"
                )
        lines.append(" ".join(offline))
        if opts.get("start_on_target", True):
            lines.append(f"virsh -c {dst} start {name}")
        return "\n".join(lines)

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

"""Migration modes as strategies: one class per mode, one file per mode.

A mode says which VM states it accepts, which libvirt flags and `virsh` lines it stands
for, what the preflight must look at (``live``, ``copies_disks``, ``definition_only``,
``shuts_down``), how the worker runs it (``run``) and how reconcile concludes it after a
worker died (``reconcile``). Nothing outside this package compares mode names: code asks
``modes.get(job.mode)`` and reads its attributes. Its options (which ones, their bounds)
live in migrations_app/options.py, keyed by the mode's ``key``.

Adding a mode: a new file here with a ``@register`` class, its key in options.MODES (and
in the schema's ``modes`` of the options it uses), a label in MigrationJob.MODES.
"""

from django.utils.translation import gettext as _

from migrations_app.options import MODE_KEYS, PlanError

REGISTRY = {}


def register(cls):
    """Class decorator: make a mode available under its key."""
    REGISTRY[cls.key] = cls()
    return cls


def get(key):
    """The mode for ``key``; PlanError for an unknown one."""
    try:
        return REGISTRY[key]
    except KeyError:
        raise PlanError(
            _("Unknown migration mode %(mode)r (choose one of: %(modes)s).")
            % {"mode": key, "modes": ", ".join(REGISTRY)}
        ) from None


class Mode:
    """What every mode answers. Subclasses set the flags and implement the methods."""

    key = ""
    live = False  # the VM keeps running while its memory is copied (pre-copy)
    copies_disks = False  # disks the target cannot see are copied
    definition_only = False  # only the definition moves (no memory, no disks)
    shuts_down = False  # the VM is shut down first

    @property
    def option_keys(self):
        return MODE_KEYS[self.key]

    def runs_on_target(self, options):
        """Whether the VM will run on the target when the move is over."""
        return self.live

    def validate_state(self, vm_name, state, running, persistent):
        """PlanError unless the VM's state and persistence fit this mode."""

    def flag_names(self, options):
        """The VIR_MIGRATE_* flags (by hypervisor.MIGRATE_FLAGS key) of the migrate call."""
        raise NotImplementedError

    def virsh_command(self, plan, src, dst, name):
        """The equivalent `virsh` line(s); ``src``, ``dst``, ``name`` are shell-quoted."""
        raise NotImplementedError

    def run(self, run, plan):
        """Run the job in the worker (after the claim and the preflight)."""
        raise NotImplementedError

    def reconcile(self, run):
        """Conclude (or re-attach to) a job whose worker stopped; returns its status."""
        raise NotImplementedError


# The mode files register themselves; imported last because they use Mode and register.
from migrations_app.modes import cold, live, live_copy, offline  # noqa: E402, F401

"""The one schema of migration options: name, kind, bounds, default, label, the modes that
use it, and the words of every refusal.

The wizard form, `manage.py migrate_vm` and `manage.py preflight`, the preflight page,
the job controls (bandwidth and maximum downtime while a job runs) and the self-service
policy all read it, so one value is accepted or refused everywhere with the same words.
A value is checked against its bounds whatever the mode (`--bandwidth -1` is wrong even
where bandwidth does not apply); then the options a mode does not use are dropped, so a
stored plan shows only what was used.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

MODES = ("live", "live-copy", "cold", "offline")
LIVE_MODES = ("live", "live-copy")
ALL = frozenset(MODES)
LIVE = frozenset(LIVE_MODES)
COLD = frozenset({"cold"})


class PlanError(ValueError):
    """A plan libvirt (or kvmweb) would refuse; the message is meant for people."""


class OptionError(ValueError):
    """A refused option value; ``name`` says which, the message is meant for people."""

    def __init__(self, message, name=None):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is bool, int, choice or uri; ``modes`` the modes that use it."""

    name: str
    kind: str
    default: object
    label: object
    modes: frozenset
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple = ()

    def clean(self, value):
        """The value as the plan stores it (None = not set), or OptionError."""
        label = str(self.label)
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if value is None or value == "":
                return False
            if isinstance(value, int | float):
                return bool(value)
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise OptionError(
                _("%(name)s must be yes or no, not %(value)r.") % {"name": label, "value": value}, self.name
            )
        if value is None or value == "":
            return None
        if self.kind == "int":
            try:
                number = int(str(value).strip())
            except ValueError:
                raise OptionError(
                    _("%(name)s must be a whole number, not %(value)r.") % {"name": label, "value": value},
                    self.name,
                ) from None
            if number < self.minimum or (self.maximum is not None and number > self.maximum):
                if self.maximum is None:
                    message = _("%(name)s must be at least %(min)d.") % {"name": label, "min": self.minimum}
                else:
                    message = _("%(name)s must be between %(min)d and %(max)d.") % {
                        "name": label,
                        "min": self.minimum,
                        "max": self.maximum,
                    }
                raise OptionError(message, self.name)
            return number
        text = str(value).strip()
        if self.kind == "choice":
            if text not in self.choices:
                raise OptionError(
                    _("%(name)s must be one of: %(choices)s.")
                    % {"name": label, "choices": ", ".join(self.choices)},
                    self.name,
                )
            return text
        if not text.startswith(("tcp://", "rdma://", "unix://")) or any(ch.isspace() for ch in text):
            raise OptionError(_("The migration URI must look like tcp://ADDRESS[:PORT]."), self.name)
        try:
            urlsplit(text).port  # noqa: B018 - raises for a port that is not 0-65535
        except ValueError:  # the checklist reads the port (migration_ports), libvirt too
            raise OptionError(
                _("The migration URI must look like tcp://ADDRESS[:PORT]."), self.name
            ) from None
        return text


SCHEMA = {
    o.name: o
    for o in (
        Option("persist", "bool", True, gettext_lazy("Keep the VM defined on the target"), ALL),
        Option("undefine_source", "bool", True, gettext_lazy("Remove the definition from the source"), ALL),
        Option("bandwidth", "int", None, gettext_lazy("bandwidth (MiB/s)"), LIVE, 1, 1_000_000),
        Option("max_downtime", "int", None, gettext_lazy("max downtime (ms)"), LIVE, 1, 3_600_000),
        Option("auto_converge", "bool", False, gettext_lazy("Auto-converge (throttle the guest CPU)"), LIVE),
        Option("compression", "bool", False, gettext_lazy("Compression"), LIVE),
        Option("parallel", "int", None, gettext_lazy("parallel connections"), LIVE, 2, 255),
        Option(
            "postcopy", "bool", False, gettext_lazy("Enable post-copy (switch later from the job page)"), LIVE
        ),
        Option("completion_timeout", "int", None, gettext_lazy("completion timeout (s)"), LIVE, 1, 604_800),
        Option(
            "completion_action",
            "choice",
            "abort",
            gettext_lazy("At the timeout"),
            LIVE,
            choices=("abort", "postcopy"),
        ),
        # The convergence ladder (migrations_app/convergence.py): while the job is "not
        # converging", raise the allowed downtime in steps, then optionally switch to
        # post-copy or abort. Unset numbers take the ladder's defaults (1000 ms, 3 steps, 10 s).
        Option(
            "convergence_policy",
            "choice",
            "none",
            gettext_lazy("Convergence policy"),
            LIVE,
            choices=("none", "ladder", "ladder-postcopy", "ladder-abort"),
        ),
        Option(
            "ladder_max_downtime",
            "int",
            None,
            gettext_lazy("ladder: highest downtime (ms)"),
            LIVE,
            1,
            3_600_000,
        ),
        Option("ladder_steps", "int", None, gettext_lazy("ladder: downtime steps"), LIVE, 1, 20),
        Option("ladder_step_seconds", "int", None, gettext_lazy("ladder: seconds per step"), LIVE, 1, 3_600),
        Option("tunnelled", "bool", False, gettext_lazy("Tunnelled through libvirtd"), LIVE),
        Option(
            "tls", "bool", False, gettext_lazy("Native TLS for the memory stream (virsh migrate --tls)"), LIVE
        ),
        Option("migrate_uri", "uri", None, gettext_lazy("Migration URI (tcp://address)"), LIVE),
        Option(
            "copy_storage",
            "choice",
            "all",
            gettext_lazy("Storage copy"),
            frozenset({"live-copy"}),
            choices=("all", "inc"),
        ),
        Option("shutdown_timeout", "int", 120, gettext_lazy("shutdown timeout (s)"), COLD, 1, 86_400),
        Option("force_off", "bool", False, gettext_lazy("Force off when the guest does not shut down"), COLD),
        Option("start_on_target", "bool", True, gettext_lazy("Start on the target afterwards"), COLD),
        Option(
            "remove_source_disks",
            "bool",
            False,
            gettext_lazy("Delete the source disks after success"),
            frozenset({"live-copy", "cold"}),
        ),
    )
}
DEFAULTS = {name: o.default for name, o in SCHEMA.items()}
MODE_KEYS = {mode: {name for name, o in SCHEMA.items() if mode in o.modes} for mode in MODES}
# Keys a request may carry besides the options (form and query-string plumbing).
NOT_OPTIONS = {"mode", "vm", "target", "csrfmiddlewaretoken", "step"}


def check_mode(mode):
    if mode not in MODES:
        raise OptionError(
            _("Unknown migration mode %(mode)r (choose one of: %(modes)s).")
            % {"mode": mode, "modes": ", ".join(MODES)},
            "mode",
        )


def parse(mode, data=None):
    """Normalize and validate the options of a plan (form data, CLI arguments, JSON).

    Every given value is checked against its bounds; unknown keys are refused; then the
    defaults fill in and the keys ``mode`` does not use are dropped."""
    check_mode(mode)
    data = dict(data or {})
    unknown = set(data) - set(SCHEMA) - NOT_OPTIONS
    if unknown:
        raise OptionError(_("Unknown option(s): %(keys)s.") % {"keys": ", ".join(sorted(unknown))})
    opts = dict(DEFAULTS)
    for name, option in SCHEMA.items():
        if name in data:
            value = option.clean(data[name])
            if value is not None or option.default is None:
                opts[name] = value
    return {k: v for k, v in opts.items() if k in MODE_KEYS[mode]}


def clean_control(name, value):
    """A control applied to a running job: bandwidth (0 = unlimited) or max_downtime."""
    if name == "bandwidth" and str(value).strip() in ("0", "0.0"):
        return 0
    cleaned = SCHEMA[name].clean(value)
    if cleaned is None:
        raise OptionError(_("%(name)s needs a value.") % {"name": str(SCHEMA[name].label)}, name)
    return cleaned


def applies(name, mode):
    """Whether option ``name`` is used by ``mode`` (policy limits apply only then)."""
    return mode in SCHEMA[name].modes

"""Free memory on the target."""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from migrations_app.preflight.registry import MIB, check, result
from migrations_app.preflight.registry import mib as _mib
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("memory", gettext_lazy("Free memory on the target"), order=100)
def check_memory(ctx):
    """The target has free memory for the guest plus a safety margin (getFreeMemory).
    For a VM that will not run on the target right away (offline, cold without start) a
    shortage is only a warning."""
    dom = ctx.domain()
    dst = ctx.host("target")
    margin = int(ctx.memory_margin_mib) * MIB
    need = dom["memory"] + margin
    free = dst["memory_free"]
    details = {
        "guest_memory_mib": _mib(dom["memory"]),
        "margin_mib": int(ctx.memory_margin_mib),
        "needed_mib": _mib(need),
        "target_free_mib": _mib(free),
    }
    if free is None:
        return result(
            WARN,
            _("%(t)s did not report its free memory.") % {"t": ctx.target.name},
            _("Check free memory on %(t)s by hand (virsh %(c)s freecell --all).")
            % {"t": ctx.target.name, "c": _uri_flag(ctx.target)},
            details,
        )
    if free >= need:
        return result(
            PASS,
            _("%(t)s has %(f)d MiB free; the VM needs %(g)d MiB plus a %(m)d MiB margin.")
            % {"t": ctx.target.name, "f": _mib(free), "g": _mib(dom["memory"]), "m": details["margin_mib"]},
            details=details,
        )
    runs_now = ctx.strategy.runs_on_target(ctx.options)
    message = _(
        "%(t)s has %(f)d MiB free, but the VM needs %(g)d MiB plus a %(m)d MiB margin (%(n)d MiB)."
    ) % {
        "t": ctx.target.name,
        "f": _mib(free),
        "g": _mib(dom["memory"]),
        "m": details["margin_mib"],
        "n": _mib(need),
    }
    remedy = _("Free memory on %(t)s (move or stop other VMs), choose another target, or shrink the VM.") % {
        "t": ctx.target.name
    }
    if not runs_now:
        return result(
            WARN,
            message + " " + _("It will not be able to start there until memory is freed."),
            remedy,
            details,
        )
    return result(FAIL, message, remedy, details, overridable=True)

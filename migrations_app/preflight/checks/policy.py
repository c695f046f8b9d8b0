"""Checks about the job itself: the VM's state fits the mode, the options are valid, and no
other job runs for the VM."""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from migrations_app.plan import PlanError
from migrations_app.preflight.context import Unavailable
from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("vm_state", gettext_lazy("VM state fits the mode"), order=40)
def check_vm_state(ctx):
    """The VM exists on the source and its state fits the mode: live modes need it
    running (or paused), offline needs it shut off and persistent, cold needs it
    persistent. Paused on an I/O error and managed-save images are flagged."""
    try:
        dom = ctx.domain()
    except Unavailable:
        try:
            ctx.need_conn("source")
        except Unavailable:
            raise
        where = ", ".join(getattr(ctx.vm, "stale_hosts", None) or []) or _("unknown")
        return result(
            FAIL,
            _("%(vm)s (UUID %(uuid)s) is not defined on %(s)s any more.")
            % {"vm": ctx.vm.name, "uuid": ctx.vm.uuid, "s": ctx.source.name},
            _("It was probably moved or removed outside kvmweb: sync the inventory of your hosts and retry."),
            {"uuid": str(ctx.vm.uuid), "source": ctx.source.name, "stale_hosts": where},
        )
    details = {
        "state": dom["state"],
        "reason": dom["state_reason"],
        "persistent": dom["persistent"],
        "managed_save": dom["managed_save"],
        "mode": ctx.mode,
    }
    try:
        ctx.plan.validate_state(state=dom["state"], persistent=dom["persistent"])
    except PlanError as exc:
        remedy = ""
        if ctx.strategy.live:
            remedy = _("Start it (virsh %(c)s start %(vm)s) or choose Cold / Offline.") % {
                "c": _uri_flag(ctx.source),
                "vm": ctx.vm.name,
            }
        elif ctx.strategy.definition_only and dom["state"] != "shutoff":
            remedy = _("Choose Live, or Cold (kvmweb shuts it down first).")
        return result(FAIL, str(exc), remedy, details)
    if dom["state"] == "paused" and dom["state_reason"] == "ioerror":
        return result(
            FAIL,
            _("%(vm)s is paused because of a disk I/O error; migrating would carry the error along.")
            % {"vm": ctx.vm.name},
            _("Fix the storage problem (full disk? lost NFS?), resume the VM, then migrate."),
            details,
        )
    if dom["state"] in ("crashed", "pmsuspended", "nostate"):
        return result(
            FAIL,
            _("%(vm)s is %(state)s; libvirt cannot migrate it in that state.")
            % {"vm": ctx.vm.name, "state": dom["state"]},
            _("Shut it off (virsh %(c)s destroy %(vm)s) and use Cold, or wake/restart it and use Live.")
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    if dom["managed_save"] and not ctx.strategy.live:
        return result(
            WARN,
            _(
                "%(vm)s has a managed-save image (a saved RAM state) on %(s)s; it is not moved and will be lost."
            )
            % {"vm": ctx.vm.name, "s": ctx.source.name},
            _(
                "Start the VM (it resumes from the image) and use Live, or discard it: virsh %(c)s managedsave-remove %(vm)s."
            )
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    if not dom["persistent"] and ctx.strategy.live and not ctx.options.get("persist", True):
        return result(
            WARN,
            _("%(vm)s is transient and stays transient on the target: it disappears when it shuts down.")
            % {"vm": ctx.vm.name},
            _("Turn on 'persist on target' to keep a definition there."),
            details,
        )
    return result(
        PASS,
        _("%(vm)s is %(state)s%(p)s, which fits %(mode)s migration.")
        % {
            "vm": ctx.vm.name,
            "state": dom["state"],
            "p": _(" and persistent") if dom["persistent"] else _(" (transient)"),
            "mode": ctx.mode,
        },
        details=details,
    )


@check("plan", gettext_lazy("Migration options"), order=50)
def check_plan(ctx):
    """The chosen options: combinations libvirt refuses are failures; risky choices
    (post-copy, no undefine-source, no persistence, tunnelled) are warnings."""
    plan = ctx.plan
    details = {"flags": plan.flag_names(), "options": dict(ctx.options)}
    try:
        plan.validate_options()
    except PlanError as exc:
        return result(FAIL, str(exc), _("Change the options."), details)
    risks = []
    if ctx.options.get("postcopy"):
        risks.append(
            _(
                "post-copy is enabled: once switched, the VM runs on the target while its memory still "
                "comes from the source; if the network or either host fails then, the VM is lost"
            )
        )
    if not ctx.strategy.definition_only and not ctx.options.get("undefine_source", True):
        risks.append(
            _(
                "the source definition is kept: a stale copy stays on %(s)s and starting it there would "
                "run the VM twice on the same disks"
            )
            % {"s": ctx.source.name}
        )
    if ctx.strategy.live and not ctx.options.get("persist", True):
        risks.append(_("the VM will be transient on the target (gone after its next shutdown)"))
    if ctx.options.get("remove_source_disks"):
        risks.append(_("the source disks are deleted after a successful copy"))
    if risks:
        return result(
            WARN,
            _("Options to be sure about: %(r)s.") % {"r": "; ".join(risks)},
            _("Acknowledge if intended, otherwise change the options."),
            details,
        )
    return result(
        PASS,
        _("Flags: %(f)s.") % {"f": ", ".join(n.upper() for n in plan.flag_names())},
        details=details,
    )


@check("jobs", gettext_lazy("No running job"), order=60)
def check_jobs(ctx):
    """No libvirt job (another migration, save, dump, backup) and no block job (copy,
    commit, pull) runs on the VM: libvirt refuses, e.g. "domain has active block job"."""
    dom = ctx.domain()
    details = {"job_type": dom["job_type"], "block_jobs": dom["block_jobs"]}
    if dom["job_type"] is None:
        return result(
            WARN,
            _("%(s)s could not say whether a job runs on the VM.") % {"s": ctx.source.name},
            _("Check by hand: virsh %(c)s domjobinfo %(vm)s should say 'Job type: None'.")
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    if dom["job_type"]:
        return result(
            FAIL,
            _("A libvirt job is already running on %(vm)s (another migration, save or backup).")
            % {"vm": ctx.vm.name},
            _(
                "Wait for it to finish (virsh %(c)s domjobinfo %(vm)s), or abort it: virsh %(c)s domjobabort %(vm)s."
            )
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    if dom["block_jobs"]:
        disks = ", ".join(sorted(dom["block_jobs"]))
        return result(
            FAIL,
            _("A block job runs on disk(s) %(d)s (copy, commit or pull); libvirt refuses to migrate.")
            % {"d": disks},
            _(
                "Wait for it (virsh %(c)s blockjob %(vm)s DISK --info) or cancel it (virsh %(c)s blockjob %(vm)s DISK --abort)."
            )
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    return result(PASS, _("No job or block job is running on the VM."), details=details)

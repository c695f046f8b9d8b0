"""CPU compatibility, machine type and the vCPU limit on the target."""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from hosts import hypervisor
from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("cpu", gettext_lazy("CPU compatibility"), order=70)
def check_cpu(ctx):
    """Same CPU architecture, and the guest CPU is accepted by the target's hypervisor
    (compareHypervisorCPU with the full <cpu> XML). host-passthrough is flagged as risky.
    A definition the source itself does not fully provide (check='none' lets QEMU drop
    features) is judged relative to the source: the target must not lack more."""
    g = ctx.guest()
    src, dst = ctx.host("source"), ctx.host("target")
    details = {
        "source_arch": src["arch"],
        "target_arch": dst["arch"],
        "guest_arch": g["arch"],
        "cpu_mode": g["cpu_mode"] or "default",
        "cpu_model": g["cpu_model"],
        "source_cpu": f"{src['cpu_vendor']} {src['cpu_model']}".strip(),
        "target_cpu": f"{dst['cpu_vendor']} {dst['cpu_model']}".strip(),
    }
    if g["arch"] not in dst["guests"]:
        return result(
            FAIL,
            _("%(t)s cannot run %(a)s guests (it offers: %(list)s).")
            % {"t": ctx.target.name, "a": g["arch"], "list": ", ".join(sorted(dst["guests"])) or "-"},
            _("Choose a target with the same CPU architecture (%(a)s).") % {"a": g["arch"]},
            details,
        )
    if src["arch"] != dst["arch"]:
        return result(
            FAIL,
            _("The hosts have different CPU architectures (%(a)s and %(b)s).")
            % {"a": src["arch"], "b": dst["arch"]},
            _("Migrate only between hosts of the same architecture."),
            details,
        )
    if src["cpu_vendor"] and dst["cpu_vendor"] and src["cpu_vendor"] != dst["cpu_vendor"]:
        details["vendor_mismatch"] = True
    mode = g["cpu_mode"]
    if mode in ("host-passthrough", "maximum"):
        # The guest sees the source's exact CPU; compare the source host CPU on the target.
        caps = ctx.domcaps("source")
        compared = ctx.need_conn("target").compare_cpu(
            caps["host_model_cpu"], g["arch"], g["machine"] or None, g["virttype"]
        )
        details["target_compare_source_host"] = compared
        if compared["result"] == "incompatible" or details.get("vendor_mismatch"):
            return result(
                FAIL,
                _("The VM uses host-passthrough and %(t)s's CPU lacks what %(s)s's CPU has: %(r)s")
                % {
                    "t": ctx.target.name,
                    "s": ctx.source.name,
                    "r": compared["reason"] or details["target_cpu"],
                },
                _(
                    "Shut the VM down and give it a named CPU model both hosts support (virsh edit: <cpu mode='custom'>), then migrate."
                ),
                details,
            )
        return result(
            WARN,
            _(
                "The VM uses %(m)s: the guest sees the exact host CPU, so it may crash or misbehave on a host with even a slightly different CPU or microcode."
            )
            % {"m": mode},
            _(
                "Safer: a named CPU model (or host-model) that both hosts support. Acknowledge if the hosts are identical."
            ),
            details,
        )
    if not g["cpu_xml"]:
        if mode == "host-model":
            # A shut-off host-model VM gets the target's own host-model CPU when it starts.
            message = _(
                "Same architecture (%(a)s); host-model: the VM takes %(t)s's CPU model when it starts there."
            )
        else:
            message = _("Same architecture (%(a)s); the VM uses the hypervisor's default CPU model.")
        return result(PASS, message % {"a": g["arch"], "t": ctx.target.name}, details=details)
    target_cmp = ctx.need_conn("target").compare_cpu(
        g["cpu_xml"], g["arch"], g["machine"] or None, g["virttype"]
    )
    details["target_compare"] = target_cmp
    if details.get("vendor_mismatch") and target_cmp["result"] != "incompatible":
        target_cmp = {"result": "incompatible", "reason": _("different CPU vendor")}
    if target_cmp["result"] != "incompatible":
        return result(
            PASS,
            _("The guest CPU (%(m)s) runs on %(t)s: %(r)s.")
            % {"m": g["cpu_model"] or mode, "t": ctx.target.name, "r": target_cmp["result"]},
            details=details,
        )
    source_cmp = ctx.need_conn("source").compare_cpu(
        g["cpu_xml"], g["arch"], g["machine"] or None, g["virttype"]
    )
    details["source_compare"] = source_cmp
    if (
        source_cmp["result"] == "incompatible"
        and _missing(source_cmp["reason"]) >= _missing(target_cmp["reason"])
        and not details.get("vendor_mismatch")
    ):
        details["note"] = _("the source does not provide these features either; the guest runs without them")
        return result(
            PASS,
            _(
                "The guest CPU (%(m)s) asks for features neither host has (%(r)s); it runs on %(s)s without them (check='%(c)s'), and %(t)s offers at least as much."
            )
            % {
                "m": g["cpu_model"],
                "r": ", ".join(sorted(_missing(target_cmp["reason"]))) or target_cmp["reason"],
                "s": ctx.source.name,
                "c": g["cpu_check"] or "none",
                "t": ctx.target.name,
            },
            details=details,
        )
    return result(
        FAIL,
        _("%(t)s cannot run the guest CPU (%(m)s): %(r)s")
        % {"t": ctx.target.name, "m": g["cpu_model"] or mode, "r": target_cmp["reason"]},
        _(
            "Choose a target with the same or a newer CPU, or (VM shut down) change the VM's CPU model to one "
            "both hosts support, e.g. the baseline from `virsh hypervisor-cpu-baseline`."
        ),
        details,
    )


def _missing(reason):
    """The feature names in libvirt's "does not provide required features: a, b"."""
    if ":" not in (reason or ""):
        return set()
    tail = reason.rsplit(":", 1)[1]
    return {f.strip() for f in tail.split(",") if f.strip()}


@check("machine", gettext_lazy("Machine type"), order=80)
def check_machine(ctx):
    """The target's hypervisor supports the VM's machine type and virtualization type
    (getDomainCapabilities; emulator paths are never compared: they may differ)."""
    g = ctx.guest()
    dst = ctx.host("target")
    details = {"machine": g["machine"], "virttype": g["virttype"], "arch": g["arch"]}
    arch = dst["guests"].get(g["arch"], {"machines": [], "domain_types": []})
    details["target_domain_types"] = arch["domain_types"]
    if g["virttype"] not in arch["domain_types"]:
        remedy = _(
            "Enable KVM on %(t)s (is /dev/kvm there? kvm module loaded?), or choose another target."
        ) % {"t": ctx.target.name}
        return result(
            FAIL,
            _("%(t)s cannot run %(v)s guests for %(a)s.")
            % {"t": ctx.target.name, "v": g["virttype"], "a": g["arch"]},
            remedy,
            details,
        )
    try:
        caps = ctx.domcaps("target")
    except hypervisor.HypervisorError as exc:
        details["error"] = exc.message
        known = g["machine"] in arch["machines"]
        if not known:
            return result(
                FAIL,
                _("%(t)s's QEMU does not offer the machine type %(m)s.")
                % {"t": ctx.target.name, "m": g["machine"]},
                _(
                    "Upgrade QEMU on %(t)s, or choose a target whose QEMU lists %(m)s (virsh %(c)s capabilities)."
                )
                % {"t": ctx.target.name, "m": g["machine"], "c": _uri_flag(ctx.target)},
                details,
            )
        return result(
            PASS,
            _("%(t)s lists the machine type %(m)s (domain capabilities unavailable: %(e)s).")
            % {"t": ctx.target.name, "m": g["machine"], "e": exc.message},
            details=details,
        )
    details["target_machine"] = caps["machine"]
    details["target_emulator"] = caps["path"]
    return result(
        PASS,
        _("%(t)s supports machine type %(m)s with %(v)s (emulator %(e)s).")
        % {"t": ctx.target.name, "m": g["machine"], "v": g["virttype"], "e": caps["path"]},
        details=details,
    )


@check("vcpus", gettext_lazy("vCPU limit"), order=90)
def check_vcpus(ctx):
    """The VM's vCPU count (its maximum, hot-pluggable ones included) is within the
    target's limit; more vCPUs than the target has CPUs is flagged as overcommit."""
    g = ctx.guest()
    dst = ctx.host("target")
    limit = None
    try:
        limit = ctx.domcaps("target")["vcpu_max"]
    except hypervisor.HypervisorError:
        pass
    if limit is None:
        limit = ctx.need_conn("target").max_vcpus(g["virttype"])
    details = {
        "vcpus": g["vcpu_current"],
        "vcpus_max": g["vcpu_max"],
        "target_limit": limit,
        "target_cpus": dst["cpus"],
    }
    if limit and g["vcpu_max"] > limit:
        return result(
            FAIL,
            _("The VM has up to %(n)d vCPUs; %(t)s allows at most %(l)d for this machine type.")
            % {"n": g["vcpu_max"], "t": ctx.target.name, "l": limit},
            _(
                "Lower the VM's vCPU maximum (virsh setvcpus --maximum --config, VM shut down) or choose a bigger target."
            ),
            details,
        )
    if dst["cpus"] and g["vcpu_current"] > dst["cpus"]:
        return result(
            WARN,
            _("The VM has %(n)d vCPUs but %(t)s has only %(c)d CPUs: it will run overcommitted and slowly.")
            % {"n": g["vcpu_current"], "t": ctx.target.name, "c": dst["cpus"]},
            _("Choose a target with at least %(n)d CPUs, or reduce the VM's vCPUs.")
            % {"n": g["vcpu_current"]},
            details,
        )
    return result(
        PASS,
        _("%(n)d vCPU(s), within %(t)s's limit of %(l)s.")
        % {"n": g["vcpu_max"], "t": ctx.target.name, "l": limit or "?"},
        details=details,
    )

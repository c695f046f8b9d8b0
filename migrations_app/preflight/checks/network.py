"""Networks on the target and the transport between the hosts."""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from hosts import hypervisor, transport
from migrations_app.preflight.context import Unavailable
from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("networks", gettext_lazy("Networks on the target"), order=110)
def check_networks(ctx):
    """Every network interface's libvirt network exists and is active on the target, and
    every bridge or direct (macvtap) device exists there."""
    g = ctx.guest()
    details = {"interfaces": g["interfaces"]}
    if not g["interfaces"]:
        return result(PASS, _("The VM has no network interfaces."), details=details)
    conn = ctx.need_conn("target")
    net_names = sorted({i["network"] for i in g["interfaces"] if i["type"] == "network" and i["network"]})
    devices = sorted(
        {
            i["bridge"] or i["dev"]
            for i in g["interfaces"]
            if i["type"] in ("bridge", "direct") and (i["bridge"] or i["dev"])
        }
    )
    nets = ctx.fact("networks:target", lambda: conn.networks_status(net_names)) if net_names else {}
    ifaces = ctx.fact("ifaces:target", conn.host_interfaces) if devices else []
    details["target_networks"] = nets
    details["target_devices"] = ifaces
    problems, remedies = [], []
    c = _uri_flag(ctx.target)
    for name in net_names:
        state = nets[name]
        if not state["exists"]:
            problems.append(_("network %(n)s does not exist on %(t)s") % {"n": name, "t": ctx.target.name})
            remedies.append(
                _(
                    "define it like on the source (virsh %(sc)s net-dumpxml %(n)s > %(n)s.xml; virsh %(c)s net-define %(n)s.xml; virsh %(c)s net-start %(n)s; virsh %(c)s net-autostart %(n)s)"
                )
                % {"n": name, "c": c, "sc": _uri_flag(ctx.source)}
            )
        elif not state["active"]:
            problems.append(
                _("network %(n)s exists on %(t)s but is not active") % {"n": name, "t": ctx.target.name}
            )
            remedies.append(
                _("virsh %(c)s net-start %(n)s; virsh %(c)s net-autostart %(n)s") % {"n": name, "c": c}
            )
    if ifaces is None:
        details["note"] = _("the target cannot list its network devices; bridges not verified")
    else:
        for dev in devices:
            if dev not in ifaces:
                problems.append(
                    _("host device %(d)s (bridge/macvtap) does not exist on %(t)s")
                    % {"d": dev, "t": ctx.target.name}
                )
                remedies.append(
                    _("create bridge %(d)s on %(t)s (same name, same network) before migrating")
                    % {"d": dev, "t": ctx.target.name}
                )
    odd = [i for i in g["interfaces"] if i["type"] in ("hostdev", "vdpa")]
    for iface in odd:
        problems.append(_("a %(t)s interface (passthrough NIC) cannot be migrated") % {"t": iface["type"]})
        remedies.append(_("detach it before migrating (virsh detach-interface) and re-attach on the target"))
    if problems:
        blocking = ctx.strategy.runs_on_target(ctx.options)
        message = "; ".join(problems) + "."
        if not blocking:
            message += " " + _("The VM will not start on the target until this is fixed.")
        return result(
            FAIL if blocking else WARN,
            message[0].upper() + message[1:],
            "; ".join(remedies) + ".",
            details,
        )
    names = [i["network"] or i["bridge"] or i["dev"] or i["type"] for i in g["interfaces"]]
    suffix = (
        ""
        if ifaces is not None or not devices
        else " " + _("(bridges not verified: the target cannot list devices)")
    )
    return result(
        PASS,
        _("Every interface's network is present and active on %(t)s: %(n)s.")
        % {"t": ctx.target.name, "n": ", ".join(names)}
        + suffix,
        details=details,
    )


@check("transport", gettext_lazy("Transport between the hosts"), order=190)
def check_transport(ctx):
    """Which connection the peer-to-peer migration uses (the source's libvirtd opens the
    target's URI) and, for qemu+tls hosts, whether the client certificates are valid:
    expired or missing fails, expiring soon warns (hosts/transport.py)."""
    status, message, remedy, details = transport.migration_check(
        ctx.source, ctx.target, tunnelled=bool(ctx.options.get("tunnelled"))
    )
    # Which transport options (--tls, --parallel, compression...) both hosts support.
    try:
        status, message, remedy, details = transport.with_option_support(
            (status, message, remedy, details), ctx.host("source"), ctx.host("target"), ctx.options
        )
    except (hypervisor.HypervisorError, Unavailable):
        pass  # the connection check names the unreachable host
    return result(status, message, remedy, details)

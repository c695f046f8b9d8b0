"""Networks on the target and the transport between the hosts."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from hosts import hypervisor, reach, transport
from hosts.uris import DEFAULT_PORTS
from migrations_app.preflight.context import Unavailable
from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.report import FAIL, PASS, SKIP, WARN


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


def _stream_endpoint(ctx):
    """(address, [ports], where the range came from) the memory stream will connect to:
    the host and port of the ``migrate_uri`` option when given, else the address in the
    target's URI and a sample of its migration range (hosts/reach.py)."""
    given = ctx.options.get("migrate_uri")
    if given:
        parts = urlsplit(given)
        if parts.hostname:
            if parts.port:
                return parts.hostname, [parts.port], _("the port of the migration URI")
            lo, hi = reach.port_range(ctx.target)
            return parts.hostname, reach.sample_ports(lo, hi), _("range %(lo)s-%(hi)s") % {"lo": lo, "hi": hi}
    lo, hi = reach.port_range(ctx.target)
    origin = (
        _("range %(lo)s-%(hi)s, as set for %(t)s")
        if getattr(ctx.target, "migration_port_min", None)
        else _("range %(lo)s-%(hi)s, QEMU's default")
    )
    return (
        (urlsplit(ctx.target.uri).hostname or "").strip("[]"),
        reach.sample_ports(lo, hi),
        origin % {"lo": lo, "hi": hi, "t": ctx.target.name},
    )


@check("migration_ports", gettext_lazy("Migration ports reachable"), order=195)
def check_migration_ports(ctx):
    """Whether the target's migration port range (and the target's libvirt port, which
    the source's libvirtd opens peer to peer) can be reached, measured on the source over
    SSH when it can be, else from kvmweb's machine, and saying which (hosts/reach.py).
    A reset counts as reachable (nothing listens yet, the packets pass); no answer within
    KVMWEB_PORT_PROBE_TIMEOUT is a firewall dropping them."""
    if not ctx.strategy.live:
        return result(PASS, _("Not needed: this mode sends no memory stream between the hosts."))
    if ctx.options.get("tunnelled"):
        return result(
            PASS, _("Not needed: a tunnelled migration sends memory inside the libvirt connection.")
        )
    address, ports, origin = _stream_endpoint(ctx)
    if not address:
        return result(SKIP, _("The target's URI names no network address; nothing to measure."))
    sch = transport.scheme(ctx.target.uri)
    control = urlsplit(ctx.target.uri).port or DEFAULT_PORTS.get(sch)
    target_host = (urlsplit(ctx.target.uri).hostname or "").strip("[]")
    probe = ports + ([control] if control and target_host == address and control not in ports else [])
    try:
        found = ctx.fact("reach", lambda: reach.measure(ctx.source, address, probe))
    except OSError as exc:
        return result(
            WARN,
            _("Could not measure: %(address)s: %(error)s")
            % {"address": address, "error": exc.strerror or exc},
            _("Use a target URI whose address kvmweb and the source resolve."),
        )
    details = found.as_details()
    details["range"] = origin
    if found.vantage == reach.SOURCE:
        where = _("measured on %(s)s over SSH") % {"s": ctx.source.name}
    else:
        where = _("measured from kvmweb's machine, not from %(s)s (%(why)s)") % {
            "s": ctx.source.name,
            "why": found.fallback,
        }
    states = ", ".join(f"{p.port} {p.state}" for p in found.ports)
    blocked_control = [p for p in found.filtered if p.port == control and control not in ports]
    blocked_stream = [p for p in found.filtered if p.port in ports]
    if not blocked_control and not blocked_stream:
        return result(
            PASS,
            _("%(addr)s answers on the probed ports (%(range)s), %(where)s: %(states)s.")
            % {"addr": address, "range": origin, "where": where, "states": states},
            details=details,
        )
    remedy = [
        _(
            "Open TCP %(lo)s-%(hi)s on %(t)s to %(s)s (firewalld: firewall-cmd --permanent --add-port=%(lo)s-%(hi)s/tcp "
            "&& firewall-cmd --reload; ufw allow from SOURCE to any port %(lo)s:%(hi)s proto tcp; nftables: "
            "tcp dport %(lo)s-%(hi)s accept), or tell kvmweb the range the target's qemu.conf sets "
            "(migration_port_min/max, host's Edit page), or choose Tunnelled, which needs no extra port."
        )
        % {
            "lo": reach.port_range(ctx.target)[0],
            "hi": reach.port_range(ctx.target)[1],
            "t": ctx.target.name,
            "s": ctx.source.name,
        }
    ]
    if blocked_control:
        remedy.insert(
            0,
            _("Let %(s)s reach %(addr)s:%(port)s (the target's libvirt port, opened peer to peer).")
            % {"s": ctx.source.name, "addr": address, "port": control},
        )
    message = _(
        "%(addr)s cannot be reached on %(ports)s (%(range)s), %(where)s: a firewall drops or rejects "
        "them. %(states)s."
    ) % {
        "addr": address,
        "ports": ", ".join(str(p.port) for p in blocked_control + blocked_stream),
        "range": origin,
        "where": where,
        "states": states,
    }
    # Measured on the source and nothing of the stream's ports answers: the migration
    # cannot connect, unless the target's migration_host is another address, hence
    # overridable.  Measured from kvmweb (another path), or only part of the range: warn.
    conclusive = found.vantage == reach.SOURCE and (blocked_control or len(blocked_stream) == len(ports))
    return result(
        FAIL if conclusive else WARN, message, " ".join(remedy), details, overridable=bool(conclusive)
    )

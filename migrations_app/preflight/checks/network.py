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
    before = status
    status, message, remedy, details = _with_p2p_probe(ctx, status, message, remedy, details)
    # virsh ran as the SSH user: as root it did what libvirtd (root) will do, so its
    # failure is conclusive; as another user file permissions may differ: overridable.
    overridable = (
        before != FAIL and details.get("p2p_verified") is False and details.get("p2p_user") != "root"
    )
    return result(status, message, remedy, details, overridable=overridable)


def _with_p2p_probe(ctx, status, message, remedy, details):
    """Add what the source itself said when it opened the target's URI (`virsh -c URI
    hostname` over kvmweb's SSH session, hosts/reach.py): verified, or a failure with
    virsh's words.  Sources not reached over SSH stay "not verified" (said in details)."""
    if not (urlsplit(ctx.target.uri).hostname or ""):
        return status, message, remedy, details
    try:
        found = _source_probe(ctx)
    except (OSError, Unavailable):
        return status, message, remedy, details
    if found.p2p is None or found.p2p["ok"] is None:  # not tried, or virsh missing there
        why = found.fallback if found.p2p is None else found.p2p["said"]
        details = {**details, "p2p_verified": None, "p2p_not_verified": why}
        return status, message, remedy, details
    details = {
        **details,
        "p2p_verified": found.p2p["ok"],
        "p2p_said": found.p2p["said"],
        "p2p_user": found.p2p["user"],
    }
    words = {
        "s": ctx.source.name,
        "uri": ctx.target.uri,
        "said": found.p2p["said"] or "—",
        "user": found.p2p["user"] or "?",
    }
    if found.p2p["ok"]:
        return (
            status,
            f"{message} "
            + _("Verified on %(s)s: virsh -c %(uri)s hostname answered %(said)s (run as %(user)s over SSH).")
            % words,
            remedy,
            details,
        )
    p2p = transport.peer_to_peer(ctx.target.uri, tunnelled=bool(ctx.options.get("tunnelled")))
    message = (
        f"{message} "
        + _("On %(s)s, virsh -c %(uri)s hostname failed (run as %(user)s over SSH): %(said)s") % words
    )
    remedy = " ".join(
        [
            remedy,
            _("The source's libvirtd opens the target's URI itself: %(needs)s.") % {"needs": p2p["needs"]},
        ]
    ).strip()
    return FAIL, message, remedy, details


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


def _probe_plan(ctx):
    """(address, stream ports, where the range came from, control port or None): what
    one checklist run measures.  Stream ports only when the mode sends a memory stream
    outside the libvirt connection (live, not tunnelled); the control port (the target
    URI's libvirt/SSH port, opened by the source's libvirtd) when it is the same address."""
    if ctx.strategy.live and not ctx.options.get("tunnelled"):
        address, ports, origin = _stream_endpoint(ctx)
    else:
        address, ports, origin = (urlsplit(ctx.target.uri).hostname or "").strip("[]"), [], ""
    target_host = (urlsplit(ctx.target.uri).hostname or "").strip("[]")
    control = urlsplit(ctx.target.uri).port or DEFAULT_PORTS.get(transport.scheme(ctx.target.uri))
    if not control or target_host != address or control in ports:
        control = None
    return address, ports, origin, control


def _source_probe(ctx):
    """The one measurement of a checklist run (hosts/reach.py), shared by the checks
    migration_ports and transport: the ports, and on an SSH source whether it opens the
    target's URI (peer to peer).  Raises OSError when the address does not resolve."""
    address, ports, _origin, control = _probe_plan(ctx)
    target_host = (urlsplit(ctx.target.uri).hostname or "").strip("[]")
    return ctx.fact(
        "reach",
        lambda: reach.measure(
            ctx.source,
            address,
            ports + ([control] if control else []),
            p2p_uri=ctx.target.uri if target_host else None,
        ),
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
    address, ports, origin, control = _probe_plan(ctx)
    if not address:
        return result(SKIP, _("The target's URI names no network address; nothing to measure."))
    try:
        found = _source_probe(ctx)
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
    blocked_control = [p for p in found.filtered if p.port == control]
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

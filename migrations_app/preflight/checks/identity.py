"""Checks about the hosts themselves: both answer, their versions, the target is another
host, and no VM of the same name or UUID waits there."""

from __future__ import annotations

from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from hosts import hypervisor
from migrations_app.preflight.registry import check, result
from migrations_app.preflight.registry import uri_flag as _uri_flag
from migrations_app.preflight.registry import version as _version
from migrations_app.preflight.report import FAIL, PASS, WARN


@check("connection", gettext_lazy("Connections"), order=10)
def check_connection(ctx):
    """Both hosts answer: libvirtd is reachable and the connection is alive. Captures
    each host's libvirt and hypervisor versions and hostname."""
    details, failures, remedies = {}, [], []
    for side, host in (("source", ctx.source), ("target", ctx.target)):
        try:
            conn = ctx.conn(side)
            facts = ctx.host(side)
            alive = conn.is_alive()
        except hypervisor.HypervisorError as exc:
            details[side] = {"host": host.name, "uri": host.uri, "error": exc.message}
            failures.append(f"{host.name}: {exc.message}")
            remedies.append(
                exc.remedy
                or _("Check that libvirtd runs on %(host)s and is reachable.") % {"host": host.name}
            )
            continue
        details[side] = {
            "host": host.name,
            "uri": host.uri,
            "alive": alive,
            "hostname": facts["hostname"],
            "libvirt": _version(facts["libvirt_version"]),
            "hypervisor": f"{facts['hypervisor_type']} {_version(facts['hypervisor_version'])}",
        }
    if failures:
        return result(
            FAIL,
            _("Cannot talk to libvirt: %(errors)s") % {"errors": "; ".join(failures)},
            " ".join(remedies),
            details,
        )
    return result(
        PASS,
        _("Both hosts answer: %(src)s (libvirt %(sv)s) and %(dst)s (libvirt %(dv)s).")
        % {
            "src": ctx.source.name,
            "sv": details["source"]["libvirt"],
            "dst": ctx.target.name,
            "dv": details["target"]["libvirt"],
        },
        details=details,
    )


@check("versions", gettext_lazy("libvirt and QEMU versions"), order=20)
def check_versions(ctx):
    """The target's QEMU and libvirt are not older than the source's: an older QEMU may
    not understand the migration stream or the machine type (Nova:
    DestinationHypervisorTooOld)."""
    src, dst = ctx.host("source"), ctx.host("target")
    details = {
        "source_libvirt": _version(src["libvirt_version"]),
        "target_libvirt": _version(dst["libvirt_version"]),
        "source_hypervisor": _version(src["hypervisor_version"]),
        "target_hypervisor": _version(dst["hypervisor_version"]),
        "source_type": src["hypervisor_type"],
        "target_type": dst["hypervisor_type"],
    }
    if src["hypervisor_type"] != dst["hypervisor_type"]:
        return result(
            FAIL,
            _("The hosts run different hypervisors (%(a)s and %(b)s).")
            % {"a": src["hypervisor_type"], "b": dst["hypervisor_type"]},
            _("Migrate only between hosts of the same hypervisor type."),
            details,
        )
    if dst["hypervisor_version"] < src["hypervisor_version"]:
        return result(
            FAIL,
            _(
                "The target runs an older QEMU (%(b)s) than the source (%(a)s): it may reject the migration stream."
            )
            % {"a": details["source_hypervisor"], "b": details["target_hypervisor"]},
            _("Upgrade QEMU on %(t)s to at least %(v)s, or choose a target that runs it.")
            % {"t": ctx.target.name, "v": details["source_hypervisor"]},
            details,
            overridable=True,
        )
    if dst["libvirt_version"] < src["libvirt_version"]:
        return result(
            WARN,
            _("The target runs an older libvirt (%(b)s) than the source (%(a)s).")
            % {"a": details["source_libvirt"], "b": details["target_libvirt"]},
            _("Usually fine with the same QEMU, but upgrade libvirt on %(t)s to avoid surprises.")
            % {"t": ctx.target.name},
            details,
        )
    return result(
        PASS,
        _(
            "The target (QEMU %(b)s, libvirt %(bl)s) is not older than the source (QEMU %(a)s, libvirt %(al)s)."
        )
        % {
            "a": details["source_hypervisor"],
            "al": details["source_libvirt"],
            "b": details["target_hypervisor"],
            "bl": details["target_libvirt"],
        },
        details=details,
    )


@check("same_host", gettext_lazy("Target is another host"), order=30)
def check_same_host(ctx):
    """The target is a different machine than the source, judged by the host UUID from
    getCapabilities (names and URIs can differ for the same machine). A target in
    maintenance (hosts.Host.maintenance) is refused here too, and not overridable."""
    if getattr(ctx.target, "maintenance", False):
        return result(
            FAIL,
            _("%(t)s is in maintenance and accepts no migrations.") % {"t": ctx.target.name}
            + (f" ({ctx.target.maintenance_reason})" if ctx.target.maintenance_reason else ""),
            _("Choose another target, or end the maintenance of %(t)s first.") % {"t": ctx.target.name},
            {"target_maintenance": True},
        )
    src, dst = ctx.host("source"), ctx.host("target")
    details = {
        "source_uuid": src["host_uuid"],
        "target_uuid": dst["host_uuid"],
        "source_hostname": src["hostname"],
        "target_hostname": dst["hostname"],
    }
    if src["host_uuid"] and src["host_uuid"] == dst["host_uuid"]:
        return result(
            FAIL,
            _("%(t)s and %(s)s are the same machine (host UUID %(u)s): libvirt refuses to migrate to itself.")
            % {"t": ctx.target.name, "s": ctx.source.name, "u": src["host_uuid"]},
            _(
                "Choose another target. If these really are two machines, give each a distinct "
                "host_uuid in /etc/libvirt/libvirtd.conf (cloned hosts share one) and restart libvirtd."
            ),
            details,
        )
    if src["hostname"] and src["hostname"] == dst["hostname"]:
        return result(
            WARN,
            _("Both hosts report the hostname %(h)s; libvirt builds the migration address from it.")
            % {"h": src["hostname"]},
            _("Give each host its own hostname, or set an explicit migration URI (tcp://ADDRESS)."),
            details,
        )
    return result(
        PASS,
        _("%(t)s is a different machine (host UUID %(u)s).") % {"t": ctx.target.name, "u": dst["host_uuid"]},
        details=details,
    )


@check("collision", gettext_lazy("No name or UUID collision"), order=130)
def check_collision(ctx):
    """No other domain on the target has the VM's name or UUID. A shut-off copy with the
    same UUID is a stale definition left by an earlier migration: starting it would run
    the VM twice on the same disks."""
    conn = ctx.need_conn("target")
    found = ctx.fact("collisions", lambda: conn.domain_collisions(ctx.vm.uuid, ctx.vm.name))
    details = {
        "by_uuid": found["by_uuid"],
        "by_name": found["by_name"],
        "stale_hosts": getattr(ctx.vm, "stale_hosts", []),
    }
    c = _uri_flag(ctx.target)
    same = found["by_uuid"]
    if same and same["state"] != "shutoff":
        return result(
            FAIL,
            _("The same VM (UUID %(u)s) is already %(s)s on %(t)s as %(n)s.")
            % {"u": ctx.vm.uuid, "s": same["state"], "t": ctx.target.name, "n": same["name"]},
            _("Find out which copy is the real one before anything else; sync the inventory."),
            details,
        )
    if same and same["name"] != ctx.vm.name:
        return result(
            FAIL,
            _(
                "%(t)s holds a shut-off definition with this VM's UUID under another name (%(n)s); libvirt refuses."
            )
            % {"t": ctx.target.name, "n": same["name"]},
            _(
                "Check it is not needed, then remove it: virsh %(c)s undefine %(n)s (add --nvram if it has UEFI variables)."
            )
            % {"c": c, "n": same["name"]},
            details,
        )
    if same:
        # libvirt accepts this (seen on the lab: the incoming definition replaces it), but
        # it means an earlier move left a copy behind that someone may have edited or
        # may start by mistake.
        return result(
            WARN,
            _(
                "%(t)s still holds a stale, shut-off definition of this VM (same name and UUID), probably left by an "
                "earlier migration without 'undefine source'. The migration will replace it."
            )
            % {"t": ctx.target.name},
            _(
                "Check it holds nothing you need (virsh %(c)s dumpxml %(n)s), or remove it first: "
                "virsh %(c)s undefine %(n)s (add --nvram if it has UEFI variables)."
            )
            % {"c": c, "n": same["name"]},
            details,
        )
    other = found["by_name"]
    if other:
        return result(
            FAIL,
            _(
                "%(t)s already has a different VM named %(n)s (UUID %(u)s, %(s)s); libvirt refuses a second one."
            )
            % {"t": ctx.target.name, "n": other["name"], "u": other["uuid"], "s": other["state"]},
            _(
                "Rename one of them (virsh %(c)s domrename %(n)s NEWNAME, VM shut off) or choose another target."
            )
            % {"c": c, "n": other["name"]},
            details,
        )
    return result(
        PASS,
        _("No VM named %(n)s or with UUID %(u)s exists on %(t)s.")
        % {"n": ctx.vm.name, "u": ctx.vm.uuid, "t": ctx.target.name},
        details=details,
    )

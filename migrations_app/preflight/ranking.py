"""Ranking the possible targets of a VM for the wizard, from stored facts only.

The wizard shows the targets before the person picks one. Running the whole checklist
against every host would open a libvirt connection to each (up to
KVMWEB_PREFLIGHT_TIMEOUT when one hangs): with dozens of hosts, some unreachable, the
page would take minutes. So the ranking reads only what the database already knows about
each host (its state at the last probe, free memory, CPU architecture and vendor,
networks and storage pools, maintenance, the self-service policy's target groups) and
the VM's inventory row, and makes no libvirt call. The full checklist
(``run.run_preflight``) then runs for the chosen target only, before anything starts.

The results reuse the checklist's ids and titles (``connection``, ``cpu``, ``memory``,
``networks``, ``storage``) so the page can show them the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils.translation import gettext as _

from hosts.models import Host
from migrations_app import modes
from migrations_app.policy import allowed_targets
from migrations_app.preflight.checks.prediction import prime_dirty_rate
from migrations_app.preflight.context import setting
from migrations_app.preflight.registry import MIB, result_for
from migrations_app.preflight.report import FAIL, PASS, WARN, Report


def _connection(host):
    if host.status == Host.REACHABLE:
        return result_for("connection", PASS, _("%(t)s answered at the last probe.") % {"t": host.name})
    if host.status == Host.UNREACHABLE:
        return result_for(
            "connection",
            FAIL,
            _("%(t)s was unreachable at the last probe: %(e)s")
            % {"t": host.name, "e": host.last_error or "?"},
            _("Check libvirtd on %(t)s, then refresh the host.") % {"t": host.name},
            {"last_seen_at": host.last_seen_at.isoformat() if host.last_seen_at else None},
        )
    return result_for(
        "connection",
        WARN,
        _("%(t)s has not been probed yet.") % {"t": host.name},
        _("Refresh the host to read its facts."),
    )


def _cpu(vm, source, host, strategy):
    if source.arch and host.arch and source.arch != host.arch:
        return result_for(
            "cpu",
            FAIL,
            _("%(t)s is %(a)s; the VM runs on %(s)s.") % {"t": host.name, "a": host.arch, "s": source.arch},
            _("Choose a target with the same CPU architecture."),
        )
    vendors = source.cpu_vendor, host.cpu_vendor
    if strategy.live and all(vendors) and vendors[0] != vendors[1]:
        return result_for(
            "cpu",
            FAIL,
            _("%(t)s has %(v)s CPUs; the VM runs on %(s)s: a running guest cannot move between CPU vendors.")
            % {"t": host.name, "v": vendors[1], "s": vendors[0]},
            _("Choose a target with the same CPU vendor, or migrate Cold."),
        )
    if (
        strategy.live
        and vm.cpu_mode == "host-passthrough"
        and source.cpu_model
        and host.cpu_model
        and source.cpu_model != host.cpu_model
    ):
        return result_for(
            "cpu",
            WARN,
            _("The VM passes its host's CPU (%(s)s) through; %(t)s has %(m)s.")
            % {"s": source.cpu_model, "t": host.name, "m": host.cpu_model},
            _("The full checklist of the chosen target compares the CPUs."),
        )
    return result_for("cpu", PASS, _("Same CPU architecture (%(a)s).") % {"a": host.arch or "?"})


def _memory(vm, host, strategy, options, margin_mib):
    need = (vm.memory or 0) + margin_mib * MIB
    free = host.memory_free
    details = {
        "target_free_mib": None if free is None else round(free / MIB),
        "needed_mib": round(need / MIB),
    }
    if free is None:
        return result_for("memory", WARN, _("%(t)s has not reported its free memory.") % {"t": host.name})
    if free >= need:
        return result_for(
            "memory",
            PASS,
            _("%(t)s had %(f)d MiB free at the last probe.") % {"t": host.name, "f": free // MIB},
            details=details,
        )
    return result_for(
        "memory",
        FAIL if strategy.runs_on_target(options) else WARN,
        _("%(t)s had %(f)d MiB free at the last probe; the VM needs %(n)d MiB with the margin.")
        % {"t": host.name, "f": free // MIB, "n": need // MIB},
        _("Free memory on %(t)s or choose another target.") % {"t": host.name},
        details,
    )


def _networks(vm, host, strategy, options):
    wanted = sorted(
        {i.get("network") for i in vm.interfaces or () if i.get("type") == "network" and i.get("network")}
    )
    if not wanted or not host.last_probe_at:
        return result_for("networks", PASS, _("No libvirt network to look for."))
    known = {n.get("name"): n for n in host.networks or ()}
    missing = [n for n in wanted if n not in known or not known[n].get("active")]
    if not missing:
        return result_for("networks", PASS, _("Every network of the VM exists on %(t)s.") % {"t": host.name})
    return result_for(
        "networks",
        FAIL if strategy.runs_on_target(options) else WARN,
        _("Networks missing or inactive on %(t)s: %(n)s.") % {"t": host.name, "n": ", ".join(missing)},
        _("Define and start them on %(t)s.") % {"t": host.name},
    )


def _storage(vm, host, strategy):
    """Copy modes: the target has an active pool at each disk's directory with room for
    the disks. Whether storage is shared is proved by the full checklist only."""
    if not strategy.copies_disks or not host.last_probe_at:
        return None
    need = {}
    for disk in vm.disks or ():
        path = disk.get("source") or ""
        if disk.get("device", "disk") == "disk" and disk.get("type") in ("file", "") and "/" in path:
            directory = path.rsplit("/", 1)[0]
            need[directory] = need.get(directory, 0) + (disk.get("capacity") or 0)
    pools = {p.get("path"): p for p in host.pools or () if p.get("active")}
    problems = []
    for directory, size in sorted(need.items()):
        pool = pools.get(directory)
        if pool is None:
            problems.append(_("no active pool at %(d)s") % {"d": directory})
        elif (pool.get("available") or 0) < size:
            problems.append(
                _("the pool at %(d)s has %(a)d MiB free, the disks need %(n)d MiB")
                % {"d": directory, "a": (pool.get("available") or 0) // MIB, "n": size // MIB}
            )
    if not problems:
        return result_for(
            "storage", PASS, _("A pool with room for the disks exists on %(t)s.") % {"t": host.name}
        )
    return result_for(
        "storage",
        WARN,
        _("On %(t)s: %(p)s.") % {"t": host.name, "p": "; ".join(problems)},
        _("The full checklist of the chosen target decides."),
    )


def rank_one(vm, host, mode, options=None, *, margin_mib=None):
    """A Report for ``host`` as a target of ``vm`` built from stored facts only."""
    strategy = modes.get(mode)
    options = dict(options or {})
    if margin_mib is None:
        margin_mib = int(setting("KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB", 256))
    results = [
        _connection(host),
        _cpu(vm, vm.host, host, strategy),
        _memory(vm, host, strategy, options, margin_mib),
        _networks(vm, host, strategy, options),
        _storage(vm, host, strategy),
    ]
    results = [r for r in results if r is not None]
    return Report(
        results=results,
        verdict=Report.verdict_of(results),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        duration_ms=0,
        plan={"mode": mode, "ranked_from": "stored facts"},
    )


def rank_targets(vm, mode, options=None, user=None):
    """Every possible target host for ``vm`` (in the user's scope, never one in
    maintenance) with a Report from stored facts, best first: hosts that answered at the
    last probe, then fewest fails, fewest warnings, most free memory, name.

    No libvirt call is made here. For a live mode, the source's dirty-rate measurement
    starts in the background (``prime_dirty_rate``, one connection to the source only)
    so the full checklist of the chosen target reuses it; nothing waits for it."""
    if vm.host is None:
        return []
    if user is None:
        hosts = Host.objects.exclude(pk=vm.host_id).exclude(maintenance=True)
    else:
        # Only targets this user may pick (a self-service policy's target groups), so the
        # wizard never offers a host that the request would then be refused for.
        hosts = allowed_targets(user, vm)
    hosts = list(hosts)
    if not hosts:
        return []
    if modes.get(mode).live:
        prime_dirty_rate(vm)
    margin_mib = int(setting("KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB", 256))
    ranked = [(host, rank_one(vm, host, mode, options, margin_mib=margin_mib)) for host in hosts]

    def key(item):
        host, report = item
        unreachable = report.result("connection").status == FAIL
        return (unreachable, len(report.fails), len(report.warnings), -(host.memory_free or 0), host.name)

    return sorted(ranked, key=key)

"""The evacuation planner: for every VM, a target and a mode, checked by the full preflight.

1. Placement (database only, no libvirt): VMs are placed biggest first on the candidate
   host with the most memory left (spreading, never "everything to one node"). A host is a
   candidate when the person may target it (migrations_app.policy.allowed_targets: host
   groups and self-service policies, and never a host in maintenance), it is not
   unreachable, it keeps ``KVMWEB_FLEET_MEMORY_MARGIN_MIB`` free after the VMs placed so far
   (only VMs that will run there count), the vCPUs of its running VMs stay within
   ``KVMWEB_FLEET_VCPU_OVERCOMMIT`` times its CPUs, and no VM on it (or placed on it) shares
   an anti-affinity tag (fleet.models.VMTag) with the VM.
2. Mode: live for a running VM (live + storage copy when the preflight's storage check
   finds a disk that is not on proved shared storage), cold only where the caller allowed
   downtime (``allow_cold``) and live is blocked, offline for a shut-off VM.
3. The full preflight (migrations_app.preflight.run_preflight) runs for every placed VM,
   at most ``KVMWEB_FLEET_PREFLIGHT_PARALLEL`` at a time; its fails become the row's
   blockers with their remedies; its prediction gives duration and downtime.
4. The total: the rows' predicted durations scheduled smallest first under the batch's
   limits (per source, per target, in total), as the scheduler will run them.
"""

from __future__ import annotations

import heapq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from django.conf import settings
from django.utils import translation
from django.utils.translation import gettext as _

from migrations_app.plan import MigrationPlan, PlanError

MIB = 1024 * 1024
# Seconds every job costs beyond libvirt's own migration time: queue pickup, the worker's
# checklist, concluding and the inventory update (measured on the lab with
# benchmarks/evacuate.py: created-to-finished minus libvirt's elapsed time, 0.5-0.8 s).
JOB_OVERHEAD_SECONDS = 0.7
OFFLINE_SECONDS = 1.0


def _setting(name, default):
    return getattr(settings, name, default)


@dataclass
class Row:
    """One VM of a plan. ``status`` is "ok" (will move), or "blocked" (stays where it is,
    ``reasons`` say why and ``remedies`` what to do)."""

    vm: object
    source: object
    target: object = None
    mode: str = ""
    options: dict = field(default_factory=dict)
    status: str = "ok"
    reasons: list = field(default_factory=list)
    remedies: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    predicted_seconds: float | None = None
    predicted_downtime_ms: float | None = None
    report: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)  # hosts the person may pick for this row

    @property
    def placed(self):
        return self.status == "ok"

    def to_dict(self):
        return {
            "vm": self.vm.name,
            "vm_id": self.vm.pk,
            "state": self.vm.state,
            "source": self.source.name if self.source else "",
            "target": self.target.name if self.target else "",
            "target_id": self.target.pk if self.target else None,
            "mode": self.mode,
            "status": self.status,
            "reasons": list(self.reasons),
            "remedies": list(self.remedies),
            "warnings": list(self.warnings),
            "predicted_seconds": self.predicted_seconds,
            "predicted_downtime_ms": self.predicted_downtime_ms,
        }


@dataclass
class Plan:
    """The planner's answer: rows in run order and the predicted total wall time."""

    rows: list
    limits: dict
    total_seconds: float = 0.0

    @property
    def placed(self):
        return [r for r in self.rows if r.placed]

    @property
    def blocked(self):
        return [r for r in self.rows if not r.placed]

    def to_dict(self):
        return {
            "rows": [r.to_dict() for r in self.rows],
            "limits": dict(self.limits),
            "total_seconds": round(self.total_seconds, 1),
            "placed": len(self.placed),
            "blocked": len(self.blocked),
        }


def tags_of(vms):
    """{vm id: set of anti-affinity tags}."""
    from fleet.models import VMTag

    out = {}
    for vm_id, name in VMTag.objects.filter(vm__in=vms).values_list("vm_id", "name"):
        out.setdefault(vm_id, set()).add(name)
    return out


def runs_on_target(vm, mode):
    """Whether the VM will use memory and CPU on the target right after the move."""
    return mode != "offline" and vm.is_running


def initial_mode(vm):
    """The first mode to try for ``vm``: live when it runs, offline when it is shut off,
    None (it stays, with a reason) otherwise."""
    if vm.is_running:
        return "live"
    if vm.is_shut_off:
        return "offline"
    return None


class _Capacity:
    """What each candidate host can still take, from its last probe and the inventory."""

    def __init__(self, hosts, moving_ids):
        from hosts.models import VM

        margin = int(_setting("KVMWEB_FLEET_MEMORY_MARGIN_MIB", 256)) * MIB
        ratio = float(_setting("KVMWEB_FLEET_VCPU_OVERCOMMIT", 4.0))
        self.memory, self.vcpus, self.tags, self.names = {}, {}, {}, {}
        resident = VM.objects.filter(host__in=hosts, gone=False).exclude(pk__in=moving_ids)
        resident_tags = tags_of(resident)
        for host in hosts:
            self.names[host.pk] = host.name
            self.memory[host.pk] = (host.memory_free or 0) - margin
            self.vcpus[host.pk] = (host.cpus or 0) * ratio
            self.tags[host.pk] = {}
        for vm in resident:
            if vm.is_running:
                self.vcpus[vm.host_id] -= vm.vcpus
            for tag in resident_tags.get(vm.pk, ()):
                self.tags[vm.host_id].setdefault(tag, vm.name)

    def why_not(self, host, vm, mode, vm_tags):
        """Why ``vm`` cannot go to ``host`` (a sentence), or "" when it fits."""
        for tag in sorted(vm_tags):
            other = self.tags[host.pk].get(tag)
            if other:
                return _("%(h)s: %(o)s there shares the anti-affinity tag %(t)s") % {
                    "h": host.name,
                    "o": other,
                    "t": tag,
                }
        if runs_on_target(vm, mode):
            if vm.memory > self.memory[host.pk]:
                return _(
                    "%(h)s: not enough free memory (%(f)d MiB left after the margin, needs %(n)d MiB)"
                ) % {
                    "h": host.name,
                    "f": max(0, self.memory[host.pk]) // MIB,
                    "n": vm.memory // MIB,
                }
            if vm.vcpus > self.vcpus[host.pk]:
                return _("%(h)s: the vCPU overcommit limit would be exceeded") % {"h": host.name}
        return ""

    def take(self, host, vm, mode, vm_tags):
        if runs_on_target(vm, mode):
            self.memory[host.pk] -= vm.memory
            self.vcpus[host.pk] -= vm.vcpus
        for tag in vm_tags:
            self.tags[host.pk].setdefault(tag, vm.name)

    def room(self, host):
        return self.memory[host.pk]


def candidates_for(user, vm):
    """Hosts ``user`` may send ``vm`` to (never a host in maintenance, never its own)."""
    from hosts.models import Host
    from migrations_app.policy import allowed_targets

    return list(allowed_targets(user, vm).exclude(status=Host.UNREACHABLE).exclude(maintenance=True))


def place(vms, user, overrides=None, options=None):
    """Step 1: a target and a first mode for every VM (Rows, blocked where nothing fits).
    ``options`` (e.g. a bandwidth cap) apply to every row; each mode keeps only the keys
    that apply to it (migrations_app/options.py)."""
    overrides = overrides or {}
    vms = list(vms)
    tags = tags_of(vms)
    rows, all_hosts = {}, {}
    for vm in vms:
        row = Row(vm=vm, source=vm.host, options=dict(options or {}))
        row.candidates = candidates_for(user, vm)
        for h in row.candidates:
            all_hosts[h.pk] = h
        rows[vm.pk] = row
    capacity = _Capacity(list(all_hosts.values()), [vm.pk for vm in vms])
    # Rows the person fixed first (they take their room), then biggest first.
    order = sorted(vms, key=lambda v: (v.pk not in overrides, -v.memory, v.name))
    for vm in order:
        row, wish = rows[vm.pk], overrides.get(vm.pk) or {}
        row.mode = wish.get("mode") or initial_mode(vm) or ""
        if vm.host is None:
            row.status, row.reasons = "blocked", [_("kvmweb does not know which host it is on.")]
            continue
        if not row.mode:
            row.status = "blocked"
            row.reasons = [
                _("It is %(s)s: only running or shut-off VMs are moved.") % {"s": vm.get_state_display()}
            ]
            row.remedies = [_("Start it or shut it off, then plan again.")]
            continue
        vm_tags = tags.get(vm.pk, set())
        if wish.get("target"):
            target = next((h for h in row.candidates if h.pk == int(wish["target"])), None)
            if target is None:
                row.status = "blocked"
                row.reasons = [
                    _("The chosen target is not available for this VM (maintenance, policy or unreachable).")
                ]
                continue
            problem = capacity.why_not(target, vm, row.mode, vm_tags)
            if problem:
                row.warnings.append(problem)
            row.target = target
            capacity.take(target, vm, row.mode, vm_tags)
            continue
        if not row.candidates:
            row.status = "blocked"
            row.reasons = [_("No host is available as a target (maintenance, unreachable or not allowed).")]
            row.remedies = [_("Register a host, end another host's maintenance, or widen the policy.")]
            continue
        fitting, why = [], []
        for host in row.candidates:
            problem = capacity.why_not(host, vm, row.mode, vm_tags)
            (why if problem else fitting).append(problem or host)
        if not fitting:
            row.status = "blocked"
            row.reasons = why
            row.remedies = [
                _("Free memory or vCPUs on a target, add a host, or change the anti-affinity tags.")
            ]
            continue
        target = max(fitting, key=lambda h: (capacity.room(h), -h.pk))
        row.target = target
        capacity.take(target, vm, row.mode, vm_tags)
    return [rows[vm.pk] for vm in vms]


def _prediction(report, mode, vm):
    """(seconds, downtime ms) from a preflight report's prediction check."""
    result = report.result("prediction")
    details = result.details if result else {}
    if mode == "offline":
        return OFFLINE_SECONDS + JOB_OVERHEAD_SECONDS, 0.0
    if mode == "cold":
        seconds = float(details.get("copy_seconds") or 0) + (30.0 if vm.is_running else 0.0)
        return seconds + JOB_OVERHEAD_SECONDS, (seconds + JOB_OVERHEAD_SECONDS) * 1000
    seconds = details.get("estimated_seconds")
    downtime = details.get("estimated_downtime_ms")
    return (float(seconds) + JOB_OVERHEAD_SECONDS if seconds is not None else None), downtime


def _local_disks(report):
    storage = report.result("storage")
    disks = (storage.details or {}).get("disks", []) if storage else []
    return any(d.get("shared") is False for d in disks)


def check_row(row, allow_cold=False, measure_dirty_rate=True, language=None):
    """Step 2 and 3 for one placed row: the full preflight, the mode it settles on, the
    blockers (fails) and warnings, the prediction. Calls libvirt: never in a transaction."""
    from migrations_app.preflight import run_preflight

    with translation.override(language):
        tried = []
        mode = row.mode
        while True:
            try:
                plan = MigrationPlan(row.vm, row.source, row.target, mode, dict(row.options))
                plan.validate()
            except PlanError as exc:
                row.status, row.reasons = "blocked", [str(exc)]
                return row
            report = run_preflight(
                plan, measure_dirty_rate=measure_dirty_rate and mode in ("live", "live-copy")
            )
            tried.append(mode)
            if mode == "live" and _local_disks(report):
                mode = "live-copy"  # a disk not on proved shared storage travels with it
                continue
            if report.fails and allow_cold and mode in ("live", "live-copy") and "cold" not in tried:
                mode = "cold"
                continue
            break
        row.mode, row.options = mode, dict(plan.options)
        row.report = report.to_dict()
        row.warnings += [f"{r.title}: {r.message}" for r in report.warnings]
        if report.fails:
            row.status = "blocked"
            row.reasons = [f"{r.title}: {r.message}" for r in report.fails]
            row.remedies = [r.remedy for r in report.fails if r.remedy]
            return row
        row.predicted_seconds, row.predicted_downtime_ms = _prediction(report, mode, row.vm)
    return row


def simulate(rows, limits):
    """Predicted wall time of ``rows`` (in order) under the limits, the way the scheduler
    runs them: start the next row whose source and target have a free slot, else wait
    for the earliest to finish."""
    per_source, per_target = limits.get("per_source", 2), limits.get("per_target", 2)
    total = limits.get("max_parallel", 4)
    pending = [r for r in rows if r.placed]
    now, running = 0.0, []  # heap of (end, source id, target id)
    src, dst = {}, {}
    while pending or running:
        started = False
        for row in list(pending):
            s, t = row.source.pk, row.target.pk
            if len(running) < total and src.get(s, 0) < per_source and dst.get(t, 0) < per_target:
                heapq.heappush(running, (now + float(row.predicted_seconds or 0), s, t))
                src[s], dst[t] = src.get(s, 0) + 1, dst.get(t, 0) + 1
                pending.remove(row)
                started = True
        if not started:
            if not running:
                break
            now, s, t = heapq.heappop(running)
            src[s] -= 1
            dst[t] -= 1
    return now


def make_plan(
    vms,
    user,
    *,
    overrides=None,
    allow_cold=False,
    limits=None,
    measure_dirty_rate=True,
    ordered=False,
    options=None,
):
    """Plan the moves of ``vms`` for ``user``: placement, the full preflight of every
    placed row (bounded parallelism), the order (smallest predicted first unless
    ``ordered``) and the predicted total at the limits."""
    limits = {"max_parallel": 4, "per_source": 2, "per_target": 2, **(limits or {})}
    rows = place(vms, user, overrides, options)
    placed = [r for r in rows if r.placed]
    language = translation.get_language()
    workers = max(1, int(_setting("KVMWEB_FLEET_PREFLIGHT_PARALLEL", 4)))
    if placed:
        with ThreadPoolExecutor(
            max_workers=min(workers, len(placed)), thread_name_prefix="fleet-plan"
        ) as pool:
            list(pool.map(lambda r: check_row(r, allow_cold, measure_dirty_rate, language), placed))
    if not ordered:
        rows.sort(key=lambda r: (not r.placed, r.predicted_seconds or 0, r.vm.name))
    plan = Plan(rows=rows, limits=limits)
    plan.total_seconds = simulate(rows, limits)
    return plan

"""Preflight: every reason a migration would fail or hurt, found before it starts.

Each check is a small function ``check_*(ctx) -> CheckResult`` with a status (pass, warn,
fail, skip), a message a sysadmin understands, a remedy that says what to do, and the raw
facts it looked at (``details``). A fail blocks the migration (an administrator may
override one marked ``overridable``); a warning needs an explicit acknowledgement.

The checks run concurrently in threads. What they need from libvirt is gathered through
``Context.fact()``, which computes each fact once per run (the first check that asks
does the work, the others wait for it), so checks stay independent but libvirt is asked
each thing once. Every libvirt call goes through hosts.hypervisor with a timeout, and the
whole checklist is bounded by KVMWEB_PREFLIGHT_TIMEOUT: an unreachable or hung host is a
fail result with a remedy, never an exception or a hang.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError
from django.utils import translation
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from hosts import hypervisor, transport
from migrations_app import modes
from migrations_app.models import LeftCopy, MigrationJob
from migrations_app.plan import MigrationPlan, PlanError

log = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STATUSES = (PASS, WARN, FAIL, SKIP)
QEMU_DEFAULT_DOWNTIME_MS = 300  # QEMU's default downtime-limit
MIB = 1024 * 1024


def _setting(name, default):
    return getattr(settings, name, default)


# ----------------------------------------------------------------------------- results


@dataclass
class CheckResult:
    """The outcome of one check. ``details`` holds the raw facts that were checked."""

    id: str
    title: str
    status: str
    message: str
    remedy: str = ""
    details: dict = field(default_factory=dict)
    overridable: bool = False

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in keys})


@dataclass
class Report:
    """A whole checklist run: results in display order, the overall verdict (the worst
    status; skip counts as pass), when it started, how long it took, and the plan."""

    results: list
    verdict: str
    started_at: str
    duration_ms: int
    plan: dict = field(default_factory=dict)

    @staticmethod
    def verdict_of(results):
        statuses = {r.status for r in results}
        if FAIL in statuses:
            return FAIL
        if WARN in statuses:
            return WARN
        return PASS

    @property
    def fails(self):
        return [r for r in self.results if r.status == FAIL]

    @property
    def warnings(self):
        return [r for r in self.results if r.status == WARN]

    @property
    def counts(self):
        return {s: sum(1 for r in self.results if r.status == s) for s in STATUSES}

    @property
    def rerun_query(self):
        """The dry-run endpoint's query string for this report's plan (re-run button)."""
        from urllib.parse import urlencode

        plan = self.plan or {}
        if not plan.get("vm", {}).get("id") or not plan.get("target", {}).get("id"):
            return ""
        query = {"vm": plan["vm"]["id"], "target": plan["target"]["id"], "mode": plan.get("mode", "")}
        for key, value in (plan.get("options") or {}).items():
            if value is None or value is False:
                continue
            query[key] = "1" if value is True else value
        return urlencode(query)

    def result(self, check_id):
        return next((r for r in self.results if r.id == check_id), None)

    def blocking_reasons(self, acknowledged_ids=(), overridden_ids=()):
        """Why this report does not allow the migration yet: every fail that is not
        (overridable and overridden), and every warning not acknowledged."""
        acknowledged, overridden = set(acknowledged_ids or ()), set(overridden_ids or ())
        reasons = []
        for r in self.results:
            if r.status == FAIL and not (r.overridable and r.id in overridden):
                reasons.append(f"{r.title}: {r.message}")
            elif r.status == WARN and r.id not in acknowledged:
                reasons.append(
                    _("Not acknowledged: %(title)s: %(message)s") % {"title": r.title, "message": r.message}
                )
        return reasons

    def to_dict(self):
        return {
            "verdict": self.verdict,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "counts": self.counts,
            "plan": self.plan,
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data):
        results = [CheckResult.from_dict(r) for r in data.get("results", [])]
        return cls(
            results=results,
            verdict=data.get("verdict") or cls.verdict_of(results),
            started_at=data.get("started_at", ""),
            duration_ms=int(data.get("duration_ms") or 0),
            plan=data.get("plan") or {},
        )


# ----------------------------------------------------------------------------- context


class Unavailable(Exception):
    """A fact a check needs could not be obtained; the check becomes ``skip`` (the cause
    is reported by the check that owns it, e.g. Connections)."""


class _Memo:
    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value = None
        self.error = None


class Context:
    """What the checks of one run share: the plan, settings, open connections, and
    facts computed once (``fact(key, fn)``), bounded by the run's deadline."""

    def __init__(self, plan, *, memory_margin_mib, deadline, measure_dirty_rate=True):
        self.plan = plan
        self.vm, self.source, self.target = plan.vm, plan.source, plan.target
        self.mode, self.options = plan.mode, plan.options
        self.strategy = plan.strategy  # the mode (migrations_app/modes/): what it moves and how
        self.memory_margin_mib = memory_margin_mib
        self.deadline = deadline
        self.measure_dirty_rate = measure_dirty_rate
        self._memo = {}
        self.left_copies = {}  # path -> LeftCopy on the target (read by run_preflight)
        self._lock = threading.Lock()
        self._conns = []

    def fact(self, key, fn):
        """The value of fact ``key``, computing it with ``fn()`` if nobody has yet.
        Errors are remembered too, so every check sees the same outcome."""
        with self._lock:
            memo = self._memo.get(key)
            mine = memo is None
            if mine:
                memo = self._memo[key] = _Memo()
        if mine:
            try:
                memo.value = fn()
            except BaseException as exc:
                memo.error = exc
            finally:
                memo.done.set()
        elif not memo.done.wait(max(0.0, self.deadline - time.monotonic())):
            raise Unavailable(_("Not checked: gathering %(what)s took too long.") % {"what": key})
        if memo.error is not None:
            raise memo.error
        return memo.value

    # -- connections and host facts ------------------------------------------------

    def conn(self, side):
        host = self.source if side == "source" else self.target

        def open_():
            conn = hypervisor.connect(
                host.uri,
                timeout=_setting("PREFLIGHT_CONNECT_TIMEOUT", 3.0),
                call_timeout=_setting("PREFLIGHT_CALL_TIMEOUT", 8.0),
            )
            with self._lock:
                self._conns.append(conn)
            return conn

        return self.fact(f"conn:{side}", open_)

    def need_conn(self, side):
        try:
            return self.conn(side)
        except hypervisor.HypervisorError:
            host = self.source if side == "source" else self.target
            raise Unavailable(
                _("Not checked: %(host)s could not be reached (see Connections).") % {"host": host.name}
            ) from None

    def host(self, side):
        conn = self.need_conn(side)
        return self.fact(f"host:{side}", conn.preflight_host)

    def domain(self):
        """The source's view of the VM; Unavailable when it is not there."""
        conn = self.need_conn("source")
        try:
            return self.fact("domain", lambda: conn.preflight_domain(self.vm.uuid))
        except hypervisor.DomainNotFound:
            raise Unavailable(
                _("Not checked: the VM was not found on %(host)s (see VM state).")
                % {"host": self.source.name}
            ) from None

    def guest(self):
        return self.fact("guest", lambda: parse_guest(self.domain()["xml"]))

    def domcaps(self, side):
        g = self.guest()
        conn = self.need_conn(side)
        return self.fact(
            f"domcaps:{side}",
            lambda: conn.domain_capabilities(g["arch"], g["machine"] or None, g["virttype"]),
        )

    def storage(self, side):
        paths = [d["path"] for d in self.guest()["disks"] if d["path"] and d["kind"] in ("file", "block")]
        paths += [p for p in (self.guest()["nvram"],) if p]
        conn = self.need_conn(side)
        return self.fact(f"storage:{side}", lambda: conn.storage_lookup(sorted(set(paths))))

    def shared_dirs(self):
        """{directory: True | False | None}: whether the target sees what the source
        writes in each disk directory, proved with a probe volume (hypervisor.probe_shared)."""
        dirs = sorted(
            {d["path"].rsplit("/", 1)[0] for d in self.guest()["disks"] if d["path"] and d["kind"] == "file"}
        )
        src, dst = self.need_conn("source"), self.need_conn("target")
        return self.fact("shared_dirs", lambda: src.probe_shared(dst, dirs))

    def close(self):
        for conn in self._conns:
            conn.close()


# ----------------------------------------------------------------------------- XML facts


def parse_guest(xml):
    """The facts of a domain definition that the checks look at, as plain data."""
    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    vcpu = root.find("vcpu")
    vcpu_max = int(vcpu.text) if vcpu is not None and vcpu.text else 1
    cpu = root.find("cpu")
    cpu_xml = ""
    if cpu is not None and (cpu.find("model") is not None or cpu.findall("feature")):
        cpu_xml = ET.tostring(cpu, encoding="unicode")
    disks = []
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        kind = disk.get("type", "file")
        path = ""
        if source is not None:
            if kind == "file":
                path = source.get("file", "")
            elif kind == "block":
                path = source.get("dev", "")
            elif kind == "network":
                path = f"{source.get('protocol', '')}:{source.get('name', '')}"
            elif kind == "volume":
                path = f"{source.get('pool', '')}/{source.get('volume', '')}"
        driver = disk.find("driver")
        target = disk.find("target")
        disks.append(
            {
                "dev": target.get("dev", "") if target is not None else "",
                "device": disk.get("device", "disk"),
                "kind": kind,
                "path": path,
                "format": driver.get("type", "") if driver is not None else "",
                "cache": (driver.get("cache") if driver is not None else None) or "default",
                "readonly": disk.find("readonly") is not None,
                "shareable": disk.find("shareable") is not None,
                "transient": disk.find("transient") is not None,
            }
        )
    interfaces = []
    for iface in root.findall("devices/interface"):
        source = iface.find("source")
        mac = iface.find("mac")
        interfaces.append(
            {
                "type": iface.get("type", ""),
                "network": source.get("network", "") if source is not None else "",
                "bridge": source.get("bridge", "") if source is not None else "",
                "dev": source.get("dev", "") if source is not None else "",
                "mac": mac.get("address", "") if mac is not None else "",
            }
        )
    nvram = root.find("os/nvram")
    nvram_path = ""
    if nvram is not None:
        nvram_path = (nvram.text or "").strip()
        src = nvram.find("source")
        if not nvram_path and src is not None:
            nvram_path = src.get("file", "")
    tpms = []
    for tpm in root.findall("devices/tpm"):
        backend = tpm.find("backend")
        tpms.append(
            {"model": tpm.get("model", ""), "backend": backend.get("type", "") if backend is not None else ""}
        )
    hostdevs = [
        {"mode": h.get("mode", "subsystem"), "type": h.get("type", "")}
        for h in root.findall("devices/hostdev")
    ]
    invtsc = any(
        f.get("name") == "invtsc" and f.get("policy", "require") in ("require", "force")
        for f in root.findall("cpu/feature")
    )
    tsc_frequency = any(t.get("frequency") for t in root.findall("clock/timer[@name='tsc']"))
    return {
        "name": root.findtext("name", ""),
        "virttype": root.get("type", "kvm"),
        "arch": os_type.get("arch", "") if os_type is not None else "",
        "machine": os_type.get("machine", "") if os_type is not None else "",
        "vcpu_max": vcpu_max,
        "vcpu_current": int(vcpu.get("current", vcpu_max)) if vcpu is not None else vcpu_max,
        "cpu_mode": (cpu.get("mode", "custom") if cpu is not None else ""),
        "cpu_check": (cpu.get("check", "") if cpu is not None else ""),
        "cpu_model": (cpu.findtext("model", "") if cpu is not None else ""),
        "cpu_xml": cpu_xml,
        "disks": disks,
        "interfaces": interfaces,
        "nvram": nvram_path,
        "loader": (root.findtext("os/loader") or "").strip(),
        "tpms": tpms,
        "hostdevs": hostdevs,
        "vdpa": [i for i in interfaces if i["type"] == "vdpa"],
        "hostdev_interfaces": [i for i in interfaces if i["type"] == "hostdev"],
        "virtiofs": [
            (f.find("target").get("dir", "") if f.find("target") is not None else "")
            for f in root.findall("devices/filesystem")
            if f.find("driver") is not None and f.find("driver").get("type") == "virtiofs"
        ],
        # libvirt migrates only shmem devices with role='master' (and never legacy ivshmem).
        "shmem": [s.get("name", "") for s in root.findall("devices/shmem") if s.get("role") != "master"],
        "invtsc_without_frequency": invtsc and not tsc_frequency,
        "secrets": sorted({sec.get("uuid") for sec in root.iter("secret") if sec.get("uuid")}),
        "graphics_listen": sorted(
            {
                addr
                for g in root.findall("devices/graphics")
                for addr in [g.get("listen", "")] + [lst.get("address", "") for lst in g.findall("listen")]
                if addr and addr not in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost")
            }
        ),
        "redirdevs": len(root.findall("devices/redirdev")),
        "host_char_devices": [
            f"{c.tag} {c.get('type')}"
            for c in root.findall("devices/*")
            if c.tag in ("serial", "parallel", "channel", "console")
            and c.get("type") in ("dev", "file", "pipe")
        ],
    }


def _mib(value):
    return None if value is None else round(value / MIB)


def _version(number):
    if not number:
        return "?"
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _sentence(text):
    """Capitalize the first letter only (paths and names keep their case)."""
    return text[:1].upper() + text[1:]


def _result(check_id, status, message, remedy="", details=None, overridable=False):
    return CheckResult(
        id=check_id,
        title=str(TITLES[check_id]),
        status=status,
        message=message,
        remedy=remedy,
        details=details or {},
        overridable=overridable,
    )


def _uri_flag(host):
    return f"-c {host.uri}"


# ----------------------------------------------------------------------------- checks


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
        return _result(
            "connection",
            FAIL,
            _("Cannot talk to libvirt: %(errors)s") % {"errors": "; ".join(failures)},
            " ".join(remedies),
            details,
        )
    return _result(
        "connection",
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
        return _result(
            "versions",
            FAIL,
            _("The hosts run different hypervisors (%(a)s and %(b)s).")
            % {"a": src["hypervisor_type"], "b": dst["hypervisor_type"]},
            _("Migrate only between hosts of the same hypervisor type."),
            details,
        )
    if dst["hypervisor_version"] < src["hypervisor_version"]:
        return _result(
            "versions",
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
        return _result(
            "versions",
            WARN,
            _("The target runs an older libvirt (%(b)s) than the source (%(a)s).")
            % {"a": details["source_libvirt"], "b": details["target_libvirt"]},
            _("Usually fine with the same QEMU, but upgrade libvirt on %(t)s to avoid surprises.")
            % {"t": ctx.target.name},
            details,
        )
    return _result(
        "versions",
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


def check_same_host(ctx):
    """The target is a different machine than the source, judged by the host UUID from
    getCapabilities (names and URIs can differ for the same machine). A target in
    maintenance (hosts.Host.maintenance) is refused here too, and not overridable."""
    if getattr(ctx.target, "maintenance", False):
        return _result(
            "same_host",
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
        return _result(
            "same_host",
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
        return _result(
            "same_host",
            WARN,
            _("Both hosts report the hostname %(h)s; libvirt builds the migration address from it.")
            % {"h": src["hostname"]},
            _("Give each host its own hostname, or set an explicit migration URI (tcp://ADDRESS)."),
            details,
        )
    return _result(
        "same_host",
        PASS,
        _("%(t)s is a different machine (host UUID %(u)s).") % {"t": ctx.target.name, "u": dst["host_uuid"]},
        details=details,
    )


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
        return _result(
            "vm_state",
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
        return _result("vm_state", FAIL, str(exc), remedy, details)
    if dom["state"] == "paused" and dom["state_reason"] == "ioerror":
        return _result(
            "vm_state",
            FAIL,
            _("%(vm)s is paused because of a disk I/O error; migrating would carry the error along.")
            % {"vm": ctx.vm.name},
            _("Fix the storage problem (full disk? lost NFS?), resume the VM, then migrate."),
            details,
        )
    if dom["state"] in ("crashed", "pmsuspended", "nostate"):
        return _result(
            "vm_state",
            FAIL,
            _("%(vm)s is %(state)s; libvirt cannot migrate it in that state.")
            % {"vm": ctx.vm.name, "state": dom["state"]},
            _("Shut it off (virsh %(c)s destroy %(vm)s) and use Cold, or wake/restart it and use Live.")
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    if dom["managed_save"] and not ctx.strategy.live:
        return _result(
            "vm_state",
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
        return _result(
            "vm_state",
            WARN,
            _("%(vm)s is transient and stays transient on the target: it disappears when it shuts down.")
            % {"vm": ctx.vm.name},
            _("Turn on 'persist on target' to keep a definition there."),
            details,
        )
    return _result(
        "vm_state",
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


def check_plan(ctx):
    """The chosen options: combinations libvirt refuses are failures; risky choices
    (post-copy, no undefine-source, no persistence, tunnelled) are warnings."""
    plan = ctx.plan
    details = {"flags": plan.flag_names(), "options": dict(ctx.options)}
    try:
        plan.validate_options()
    except PlanError as exc:
        return _result("plan", FAIL, str(exc), _("Change the options."), details)
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
        return _result(
            "plan",
            WARN,
            _("Options to be sure about: %(r)s.") % {"r": "; ".join(risks)},
            _("Acknowledge if intended, otherwise change the options."),
            details,
        )
    return _result(
        "plan",
        PASS,
        _("Flags: %(f)s.") % {"f": ", ".join(n.upper() for n in plan.flag_names())},
        details=details,
    )


def check_jobs(ctx):
    """No libvirt job (another migration, save, dump, backup) and no block job (copy,
    commit, pull) runs on the VM: libvirt refuses, e.g. "domain has active block job"."""
    dom = ctx.domain()
    details = {"job_type": dom["job_type"], "block_jobs": dom["block_jobs"]}
    if dom["job_type"] is None:
        return _result(
            "jobs",
            WARN,
            _("%(s)s could not say whether a job runs on the VM.") % {"s": ctx.source.name},
            _("Check by hand: virsh %(c)s domjobinfo %(vm)s should say 'Job type: None'.")
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    if dom["job_type"]:
        return _result(
            "jobs",
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
        return _result(
            "jobs",
            FAIL,
            _("A block job runs on disk(s) %(d)s (copy, commit or pull); libvirt refuses to migrate.")
            % {"d": disks},
            _(
                "Wait for it (virsh %(c)s blockjob %(vm)s DISK --info) or cancel it (virsh %(c)s blockjob %(vm)s DISK --abort)."
            )
            % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
            details,
        )
    return _result("jobs", PASS, _("No job or block job is running on the VM."), details=details)


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
        return _result(
            "cpu",
            FAIL,
            _("%(t)s cannot run %(a)s guests (it offers: %(list)s).")
            % {"t": ctx.target.name, "a": g["arch"], "list": ", ".join(sorted(dst["guests"])) or "-"},
            _("Choose a target with the same CPU architecture (%(a)s).") % {"a": g["arch"]},
            details,
        )
    if src["arch"] != dst["arch"]:
        return _result(
            "cpu",
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
            return _result(
                "cpu",
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
        return _result(
            "cpu",
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
        return _result("cpu", PASS, message % {"a": g["arch"], "t": ctx.target.name}, details=details)
    target_cmp = ctx.need_conn("target").compare_cpu(
        g["cpu_xml"], g["arch"], g["machine"] or None, g["virttype"]
    )
    details["target_compare"] = target_cmp
    if details.get("vendor_mismatch") and target_cmp["result"] != "incompatible":
        target_cmp = {"result": "incompatible", "reason": _("different CPU vendor")}
    if target_cmp["result"] != "incompatible":
        return _result(
            "cpu",
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
        return _result(
            "cpu",
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
    return _result(
        "cpu",
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
        return _result(
            "machine",
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
            return _result(
                "machine",
                FAIL,
                _("%(t)s's QEMU does not offer the machine type %(m)s.")
                % {"t": ctx.target.name, "m": g["machine"]},
                _(
                    "Upgrade QEMU on %(t)s, or choose a target whose QEMU lists %(m)s (virsh %(c)s capabilities)."
                )
                % {"t": ctx.target.name, "m": g["machine"], "c": _uri_flag(ctx.target)},
                details,
            )
        return _result(
            "machine",
            PASS,
            _("%(t)s lists the machine type %(m)s (domain capabilities unavailable: %(e)s).")
            % {"t": ctx.target.name, "m": g["machine"], "e": exc.message},
            details=details,
        )
    details["target_machine"] = caps["machine"]
    details["target_emulator"] = caps["path"]
    return _result(
        "machine",
        PASS,
        _("%(t)s supports machine type %(m)s with %(v)s (emulator %(e)s).")
        % {"t": ctx.target.name, "m": g["machine"], "v": g["virttype"], "e": caps["path"]},
        details=details,
    )


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
        return _result(
            "vcpus",
            FAIL,
            _("The VM has up to %(n)d vCPUs; %(t)s allows at most %(l)d for this machine type.")
            % {"n": g["vcpu_max"], "t": ctx.target.name, "l": limit},
            _(
                "Lower the VM's vCPU maximum (virsh setvcpus --maximum --config, VM shut down) or choose a bigger target."
            ),
            details,
        )
    if dst["cpus"] and g["vcpu_current"] > dst["cpus"]:
        return _result(
            "vcpus",
            WARN,
            _("The VM has %(n)d vCPUs but %(t)s has only %(c)d CPUs: it will run overcommitted and slowly.")
            % {"n": g["vcpu_current"], "t": ctx.target.name, "c": dst["cpus"]},
            _("Choose a target with at least %(n)d CPUs, or reduce the VM's vCPUs.")
            % {"n": g["vcpu_current"]},
            details,
        )
    return _result(
        "vcpus",
        PASS,
        _("%(n)d vCPU(s), within %(t)s's limit of %(l)s.")
        % {"n": g["vcpu_max"], "t": ctx.target.name, "l": limit or "?"},
        details=details,
    )


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
        return _result(
            "memory",
            WARN,
            _("%(t)s did not report its free memory.") % {"t": ctx.target.name},
            _("Check free memory on %(t)s by hand (virsh %(c)s freecell --all).")
            % {"t": ctx.target.name, "c": _uri_flag(ctx.target)},
            details,
        )
    if free >= need:
        return _result(
            "memory",
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
        return _result(
            "memory",
            WARN,
            message + " " + _("It will not be able to start there until memory is freed."),
            remedy,
            details,
        )
    return _result("memory", FAIL, message, remedy, details, overridable=True)


def check_networks(ctx):
    """Every network interface's libvirt network exists and is active on the target, and
    every bridge or direct (macvtap) device exists there."""
    g = ctx.guest()
    details = {"interfaces": g["interfaces"]}
    if not g["interfaces"]:
        return _result("networks", PASS, _("The VM has no network interfaces."), details=details)
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
        return _result(
            "networks",
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
    return _result(
        "networks",
        PASS,
        _("Every interface's network is present and active on %(t)s: %(n)s.")
        % {"t": ctx.target.name, "n": ", ".join(names)}
        + suffix,
        details=details,
    )


def check_storage(ctx):
    """Every disk is visible at the same path on the target (shared storage), or the
    plan copies it (live with storage copy, cold) into a target pool at the same
    directory with enough free space. Offline moves no disk at all. Secrets the disks
    use (LUKS passphrases, RBD/iSCSI credentials) must exist on the target."""
    g = ctx.guest()
    dom = ctx.domain()
    disks = [d for d in g["disks"] if d["path"] and d["kind"] in ("file", "block", "network", "volume")]
    details = {"disks": []}
    if not disks:
        return _result("storage", PASS, _("The VM has no disks with a source."), details=details)
    src = ctx.storage("source")
    dst = ctx.storage("target")
    problems, remedies, notes, warns = [], [], [], []
    to_copy, unverified = [], []
    for d in disks:
        row = {"dev": d["dev"], "path": d["path"], "kind": d["kind"], "device": d["device"]}
        details["disks"].append(row)
        if d["kind"] in ("network", "volume"):
            # Network disks (rbd, iscsi, gluster, nbd) are reachable from any host that has
            # the credentials; pool volumes are named per host and not verified here.
            row["shared"] = d["kind"] == "network"
            notes.append(
                _("disk %(dev)s is %(k)s storage (%(p)s), not checked by path")
                % {"dev": d["dev"], "k": d["kind"], "p": d["path"]}
            )
            continue
        s, t = src.get(d["path"], {}), dst.get(d["path"], {})
        sizes = dom["disk_sizes"].get(d["dev"], {})
        row.update(
            visible_on_target=bool(t.get("visible")),
            target_pool=t.get("pool"),
            source_pool=s.get("pool"),
            capacity=sizes.get("capacity") or s.get("capacity"),
            allocation=sizes.get("physical") or s.get("allocation"),
        )
        # A file at the same path proves nothing (it may be a copy an earlier move left
        # behind, with older data): only a probe volume seen from both hosts does.
        proof = ctx.shared_dirs().get(d["path"].rsplit("/", 1)[0]) if d["kind"] == "file" else None
        row["shared_proof"] = proof
        if t.get("visible") and proof is not True:
            row["shared"] = False
            left = ctx.left_copies.get(d["path"])
            if proof is None and ctx.strategy.live:
                warns.append(
                    _(
                        "kvmweb cannot prove that %(t)s sees the same file at %(p)s (no active storage pool at "
                        "its directory on both hosts); libvirt refuses the live migration if it does not"
                    )
                    % {"t": ctx.target.name, "p": d["path"]}
                )
                unverified.append(d["path"].rsplit("/", 1)[0])
                continue
            if proof is None:
                text = _(
                    "disk %(dev)s: %(t)s has a file at %(p)s, and kvmweb cannot prove it is the same file "
                    "(no active storage pool at its directory on both hosts)"
                )
            else:
                text = _(
                    "disk %(dev)s: %(t)s has a different file at %(p)s: that directory is not shared between "
                    "the hosts (proved with a probe file), so it is another copy, possibly with older data"
                )
            text = text % {"dev": d["dev"], "t": ctx.target.name, "p": d["path"]}
            if left is not None:
                text += " " + _("(a copy left on %(t)s by job #%(job)s on %(at)s)") % {
                    "t": ctx.target.name,
                    "job": left.job_id or "?",
                    "at": left.created_at.strftime("%Y-%m-%d %H:%M"),
                }
                row["left_copy"] = left.pk
            problems.append(text)
            remedies.append(
                _(
                    "delete that copy on %(t)s first (the VM page lists the copies kvmweb left behind and "
                    "deletes them), or rename it; kvmweb never boots a VM from a copy it cannot prove current"
                )
                % {"t": ctx.target.name}
            )
            continue
        same_file = bool(t.get("visible"))
        row["shared"] = same_file
        if same_file:
            if ctx.strategy.live and ctx.strategy.copies_disks:
                warns.append(
                    _(
                        "%(dev)s (%(p)s) is already on storage %(t)s sees; a full storage copy would copy it onto itself"
                    )
                    % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
                )
            continue
        if d["device"] == "cdrom" or d["readonly"]:
            problems.append(
                _("disk %(dev)s: the CD-ROM/read-only image %(p)s is not on %(t)s")
                % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
            )
            remedies.append(
                _(
                    "eject it (virsh change-media %(vm)s %(dev)s --eject) or copy the image to the same path on the target"
                )
                % {"vm": ctx.vm.name, "dev": d["dev"]}
            )
            continue
        if (
            not ctx.strategy.copies_disks
            and not s.get("visible")
            and not s.get("dir_pool")
            and not t.get("dir_pool")
        ):
            # No storage pool covers this directory on either host: libvirt cannot tell
            # whether the target sees the file (a plain NFS mount, say). Say so, don't guess.
            row["shared"] = None
            warns.append(
                _(
                    "disk %(dev)s (%(p)s) is in no libvirt storage pool on either host, so kvmweb cannot verify that %(t)s sees it"
                )
                % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
            )
            unverified.append(d["path"].rsplit("/", 1)[0])
            continue
        to_copy.append((d, row, t))
    if to_copy and not ctx.strategy.copies_disks:
        for d, _row, _t in to_copy:
            problems.append(
                _("disk %(dev)s (%(p)s) is on storage %(t)s cannot see")
                % {"dev": d["dev"], "p": d["path"], "t": ctx.target.name}
            )
        if ctx.strategy.live:
            remedies.append(
                _(
                    "choose Live with storage copy (copies the disks while the VM runs), or move the disks to shared storage"
                )
            )
        else:
            remedies.append(
                _(
                    "offline migration moves only the definition: choose Cold (copies the disks), or move the disks to shared storage"
                )
            )
    elif to_copy:
        # live-copy and cold: a pool on the target at the disk's directory must take it.
        need_by_pool = {}
        for d, row, t in to_copy:
            pool = t.get("dir_pool")
            row["copy_to_pool"] = pool["name"] if pool else None
            if not pool:
                problems.append(
                    _("disk %(dev)s: %(t)s has no storage pool at %(dir)s to receive the copy")
                    % {"dev": d["dev"], "t": ctx.target.name, "dir": d["path"].rsplit("/", 1)[0]}
                )
                remedies.append(
                    _(
                        "create one: virsh %(c)s pool-define-as NAME dir --target %(dir)s; virsh %(c)s pool-start NAME"
                    )
                    % {"c": _uri_flag(ctx.target), "dir": d["path"].rsplit("/", 1)[0]}
                )
                continue
            if not pool["active"]:
                problems.append(
                    _("disk %(dev)s: pool %(p)s on %(t)s is not active")
                    % {"dev": d["dev"], "p": pool["name"], "t": ctx.target.name}
                )
                remedies.append(
                    _("virsh %(c)s pool-start %(p)s") % {"c": _uri_flag(ctx.target), "p": pool["name"]}
                )
                continue
            entry = need_by_pool.setdefault(
                pool["name"], {"available": pool["available"], "need": 0, "capacity": 0}
            )
            entry["need"] += row["allocation"] or row["capacity"] or 0
            entry["capacity"] += row["capacity"] or 0
        details["copy_pools"] = need_by_pool
        for name, entry in need_by_pool.items():
            if entry["available"] < entry["need"]:
                problems.append(
                    _("pool %(p)s on %(t)s has %(a)d MiB free; the copy needs %(n)d MiB")
                    % {
                        "p": name,
                        "t": ctx.target.name,
                        "a": _mib(entry["available"]),
                        "n": _mib(entry["need"]),
                    }
                )
                remedies.append(
                    _("free space in pool %(p)s on %(t)s or choose another target")
                    % {"p": name, "t": ctx.target.name}
                )
            elif entry["available"] < entry["capacity"]:
                warns.append(
                    _(
                        "pool %(p)s on %(t)s can hold today's data (%(n)d MiB) but not the disks' full size (%(c)d MiB)"
                    )
                    % {
                        "p": name,
                        "t": ctx.target.name,
                        "n": _mib(entry["need"]),
                        "c": _mib(entry["capacity"]),
                    }
                )
    details["copy"] = [row["dev"] for _d, row, _t in to_copy]
    if g["secrets"]:
        conn = ctx.need_conn("target")
        present = ctx.fact("secrets:target", lambda: conn.secrets_present(g["secrets"]))
        details["secrets_on_target"] = present
        for uuid in sorted(u for u, ok in present.items() if not ok):
            problems.append(
                _("secret %(u)s (disk passphrase or storage credentials) is missing on %(t)s")
                % {"u": uuid, "t": ctx.target.name}
            )
            remedies.append(
                _(
                    "define it there: virsh %(sc)s secret-dumpxml %(u)s > s.xml; virsh %(c)s secret-define s.xml; virsh %(c)s secret-set-value %(u)s --file VALUEFILE"
                )
                % {"u": uuid, "c": _uri_flag(ctx.target), "sc": _uri_flag(ctx.source)}
            )
    if problems:
        text = "; ".join(problems) + "."
        return _result("storage", FAIL, _sentence(text), _sentence("; ".join(remedies)) + ".", details)
    if warns:
        text = "; ".join(warns) + "."
        remedy = _("Acknowledge if intended.")
        if unverified:
            remedy = _(
                "Define a storage pool for %(dirs)s on both hosts (virsh pool-define-as NAME dir --target DIR; "
                "virsh pool-start NAME) so kvmweb can check, or acknowledge if you know the target sees it."
            ) % {"dirs": ", ".join(sorted(set(unverified)))}
        elif (
            ctx.strategy.live and ctx.strategy.copies_disks and any(r.get("shared") for r in details["disks"])
        ):
            remedy = _(
                "Use plain Live when every disk is shared; with mixed disks kvmweb copies only the disks listed under 'copy'."
            )
        return _result("storage", WARN, text[0].upper() + text[1:], remedy, details)
    if to_copy:
        msg = _("%(n)d disk(s) will be copied to %(t)s (%(d)s); the pools there have room.") % {
            "n": len(to_copy),
            "t": ctx.target.name,
            "d": ", ".join(row["dev"] for _d, row, _t in to_copy),
        }
    else:
        msg = _("Every disk is on storage %(t)s shares (proved with a probe file).") % {"t": ctx.target.name}
    if notes:
        msg += " " + "; ".join(notes) + "."
    return _result("storage", PASS, msg, details=details)


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
        return _result(
            "collision",
            FAIL,
            _("The same VM (UUID %(u)s) is already %(s)s on %(t)s as %(n)s.")
            % {"u": ctx.vm.uuid, "s": same["state"], "t": ctx.target.name, "n": same["name"]},
            _("Find out which copy is the real one before anything else; sync the inventory."),
            details,
        )
    if same and same["name"] != ctx.vm.name:
        return _result(
            "collision",
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
        return _result(
            "collision",
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
        return _result(
            "collision",
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
    return _result(
        "collision",
        PASS,
        _("No VM named %(n)s or with UUID %(u)s exists on %(t)s.")
        % {"n": ctx.vm.name, "u": ctx.vm.uuid, "t": ctx.target.name},
        details=details,
    )


def check_snapshots(ctx):
    """No snapshot or checkpoint metadata: libvirt (9.0, seen on the lab) refuses to
    migrate a VM with either, live or offline; the metadata would not travel anyway."""
    dom = ctx.domain()
    details = {"snapshots": dom["snapshots"], "checkpoints": dom["checkpoints"]}
    c = _uri_flag(ctx.source)
    if dom["checkpoints"]:
        return _result(
            "snapshots",
            FAIL,
            _("The VM has %(n)d checkpoint(s) (%(l)s); libvirt cannot migrate a VM with checkpoints.")
            % {"n": len(dom["checkpoints"]), "l": ", ".join(dom["checkpoints"])},
            _("Delete them (virsh %(c)s checkpoint-delete %(vm)s NAME --metadata) before migrating.")
            % {"c": c, "vm": ctx.vm.name},
            details,
        )
    if dom["snapshots"]:
        return _result(
            "snapshots",
            FAIL,
            _(
                'The VM has %(n)d snapshot(s) (%(l)s); libvirt refuses to migrate it ("cannot migrate domain with snapshots"), in every mode.'
            )
            % {"n": len(dom["snapshots"]), "l": ", ".join(dom["snapshots"][:10])},
            _(
                "Keep what you need (virsh %(c)s snapshot-dumpxml %(vm)s NAME > NAME.xml, to re-create on the target "
                "with snapshot-create --redefine), then drop the metadata: virsh %(c)s snapshot-delete %(vm)s NAME --metadata"
            )
            % {"c": c, "vm": ctx.vm.name},
            details,
        )
    return _result("snapshots", PASS, _("No snapshots or checkpoints."), details=details)


def check_devices(ctx):
    """No device that cannot be migrated (mirror of libvirt's qemuMigrationSrcIsAllowed):
    host devices (PCI/USB/SCSI/mdev passthrough), vDPA, virtiofs, non-master shared
    memory, transient disks, invtsc without a fixed TSC frequency. Host-bound character
    devices, USB redirection and a display bound to a specific address are warnings."""
    g = ctx.guest()
    details = {
        "hostdevs": g["hostdevs"],
        "virtiofs": g["virtiofs"],
        "shmem": g["shmem"],
        "transient_disks": [d["dev"] for d in g["disks"] if d["transient"]],
        "invtsc_without_frequency": g["invtsc_without_frequency"],
        "redirdevs": g["redirdevs"],
        "host_char_devices": g["host_char_devices"],
        "graphics_listen": g["graphics_listen"],
    }
    blockers = []
    if g["hostdevs"]:
        blockers.append(
            _("%(n)d host device(s) passed through (%(t)s)")
            % {"n": len(g["hostdevs"]), "t": ", ".join(sorted({h["type"] for h in g["hostdevs"]}))}
        )
    if g["virtiofs"]:
        blockers.append(_("virtiofs shared folder(s)"))
    if g["shmem"]:
        blockers.append(_("shared memory device(s) %(n)s") % {"n": ", ".join(g["shmem"])})
    if details["transient_disks"]:
        blockers.append(_("transient disk(s) %(d)s") % {"d": ", ".join(details["transient_disks"])})
    if g["invtsc_without_frequency"]:
        blockers.append(_("the invtsc CPU feature without a fixed TSC frequency"))
    if blockers:
        live = ctx.strategy.live
        message = _("Cannot be migrated while running: %(b)s.") % {"b": "; ".join(blockers)}
        remedy = _(
            "Detach them (virsh %(c)s detach-device %(vm)s DEVICE.xml --live --config) and re-attach on the target, or use Cold."
        ) % {
            "c": _uri_flag(ctx.source),
            "vm": ctx.vm.name,
        }
        if not live:
            return _result(
                "devices",
                WARN,
                message
                + " "
                + _(
                    "A cold or offline move is allowed, but the same devices must exist on the target to start it."
                ),
                _("Make sure the target has the same host devices, or remove them from the definition."),
                details,
            )
        return _result("devices", FAIL, message, remedy, details)
    warns = []
    if g["redirdevs"]:
        warns.append(
            _("%(n)d USB redirection device(s) (the client connection is lost)") % {"n": g["redirdevs"]}
        )
    if g["graphics_listen"]:
        warns.append(
            _(
                "the display listens on %(a)s, an address the target must also have (or QEMU fails to start there)"
            )
            % {"a": ", ".join(g["graphics_listen"])}
        )
    if g["host_char_devices"]:
        warns.append(
            _("host-bound character device(s) %(d)s (the same path must exist on the target)")
            % {"d": ", ".join(g["host_char_devices"])}
        )
    if warns:
        return _result(
            "devices", WARN, _sentence("; ".join(warns)) + ".", _("Check these exist on the target."), details
        )
    return _result("devices", PASS, _("No passthrough or other non-migratable devices."), details=details)


def check_firmware(ctx):
    """UEFI variables (NVRAM file) and TPM state: offline migration copies neither;
    live migration carries the emulated TPM but needs the NVRAM file on the target."""
    g = ctx.guest()
    details = {"nvram": g["nvram"], "loader": g["loader"], "tpms": g["tpms"]}
    if not g["nvram"] and not g["tpms"]:
        return _result(
            "firmware", PASS, _("No UEFI variable store and no TPM to carry over."), details=details
        )
    problems, warns, notes = [], [], []
    if g["nvram"]:
        seen = ctx.storage("target").get(g["nvram"], {})
        details["nvram_visible_on_target"] = bool(seen.get("visible"))
        if seen.get("visible"):
            notes.append(_("UEFI variables %(p)s are on shared storage") % {"p": g["nvram"]})
        elif ctx.strategy.definition_only:
            problems.append(
                _(
                    "offline migration does not copy the UEFI variable store %(p)s; boot entries and Secure Boot keys would be lost"
                )
                % {"p": g["nvram"]}
            )
        elif ctx.strategy.shuts_down:
            warns.append(
                _("the UEFI variable store %(p)s is not on the target: it must be copied with the disks")
                % {"p": g["nvram"]}
            )
        else:
            warns.append(
                _(
                    "the UEFI variable store %(p)s is not on the target; libvirt re-creates it from the template, so variables changed since boot may be lost"
                )
                % {"p": g["nvram"]}
            )
    for tpm in g["tpms"]:
        if tpm["backend"] == "passthrough":
            problems.append(_("a host TPM is passed through; it cannot move"))
        elif tpm["backend"] == "emulator":
            if ctx.strategy.live:
                notes.append(_("the emulated TPM's state travels with the migration stream"))
            else:
                warns.append(
                    _(
                        "the emulated TPM's state (/var/lib/libvirt/swtpm/%(u)s) is not copied by a cold or offline move"
                    )
                    % {"u": ctx.vm.uuid}
                )
    remedy = _(
        "Copy the file(s) to the same path on %(t)s first (e.g. scp as root), or use Live migration."
    ) % {"t": ctx.target.name}
    if problems:
        text = "; ".join(problems + warns) + "."
        return _result("firmware", FAIL, text[0].upper() + text[1:], remedy, details, overridable=True)
    if warns:
        text = "; ".join(warns) + "."
        return _result("firmware", WARN, text[0].upper() + text[1:], remedy, details)
    text = "; ".join(notes) + "."
    return _result("firmware", PASS, text[0].upper() + text[1:], details=details)


def check_disk_cache(ctx):
    """Writable disks use cache='none' or 'directsync' for a live move: with a host page
    cache the target may read stale data (libvirt refuses on non-cluster filesystems
    unless --unsafe). Cold and offline moves flush at shutdown."""
    g = ctx.guest()
    rows = [
        {"dev": d["dev"], "cache": d["cache"]}
        for d in g["disks"]
        if d["device"] == "disk" and not d["readonly"] and d["path"]
    ]
    details = {"disks": rows, "mode": ctx.mode}
    unsafe = [r for r in rows if r["cache"] not in ("none", "directsync")]
    if not unsafe:
        return _result(
            "disk_cache", PASS, _("Every writable disk uses cache='none' or 'directsync'."), details=details
        )
    if not ctx.strategy.live:
        return _result(
            "disk_cache",
            PASS,
            _("Cache modes (%(l)s) do not matter for a move of a shut-off VM.")
            % {"l": ", ".join(f"{r['dev']}={r['cache']}" for r in unsafe)},
            details=details,
        )
    listed = ", ".join(f"{r['dev']}: cache={r['cache']}" for r in unsafe)
    if ctx.strategy.copies_disks:
        return _result(
            "disk_cache",
            WARN,
            _(
                "Disk cache mode (%(l)s) keeps writes in the source's page cache; the copy mirrors them, but cache='none' is safer."
            )
            % {"l": listed},
            _("Set cache='none' on the disks (virsh edit, then restart the VM) when convenient."),
            details,
        )
    return _result(
        "disk_cache",
        WARN,
        _(
            "Unsafe disk cache mode for a live move (%(l)s): writes still in the source's page cache may not be seen by the target; libvirt refuses this on shared filesystems that are not cluster filesystems."
        )
        % {"l": listed},
        _(
            "Set cache='none' (or 'directsync') on the disk (virsh %(c)s edit %(vm)s: <driver ... cache='none'/>), restart the VM, then migrate."
        )
        % {"c": _uri_flag(ctx.source), "vm": ctx.vm.name},
        details,
    )


# -- prediction -------------------------------------------------------------------------

_dirty_cache = {}
_dirty_lock = threading.Lock()


def measure_dirty_rate(conn, host, uuid):
    """The VM's dirty rate in MiB/s, measured by libvirt (startDirtyRateCalc). A recent
    measurement of the same VM on the same host is reused (concurrent runs share one);
    raises HypervisorError where the host cannot measure."""
    key = (host.uri, str(uuid))
    max_age = _setting("PREFLIGHT_DIRTY_RATE_MAX_AGE", 60.0)
    with _dirty_lock:
        entry = _dirty_cache.get(key)
        if entry and entry["event"].is_set() and time.monotonic() - entry["at"] > max_age:
            entry = None
        if entry is None:
            entry = _dirty_cache[key] = {
                "event": threading.Event(),
                "at": time.monotonic(),
                "value": None,
                "error": None,
            }
            mine = True
        else:
            mine = False
    if mine:
        try:
            entry["value"] = conn.measure_dirty_rate(
                uuid,
                seconds=_setting("PREFLIGHT_DIRTY_RATE_SECONDS", 1),
                mode=_setting("PREFLIGHT_DIRTY_RATE_MODE", "page-sampling"),
            )
            entry["value"]["measured_at"] = time.time()
        except hypervisor.HypervisorError as exc:
            entry["error"] = exc
            with _dirty_lock:
                _dirty_cache.pop(key, None)  # do not remember failures
        finally:
            entry["at"] = time.monotonic()
            entry["event"].set()
    else:
        entry["event"].wait(_setting("PREFLIGHT_DIRTY_RATE_SECONDS", 1) + 5)
    if entry["error"] is not None:
        raise entry["error"]
    if entry["value"] is None:
        raise hypervisor.HypervisorTimeout(_("The dirty-rate measurement did not finish in time."))
    return dict(entry["value"], age_s=round(time.monotonic() - entry["at"], 1))


def prime_dirty_rate(vm):
    """Start measuring a running VM's dirty rate in the background, so a checklist run in
    the next KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE seconds reuses it instead of waiting a
    second (the wizard calls this as soon as a VM is chosen, before the target is). A
    checklist that starts while the measurement runs waits for it rather than starting a
    second one. Returns the thread, or None when there is nothing to measure."""
    host = vm.host
    if host is None or not getattr(vm, "is_running", False):
        return None

    def work():
        try:
            conn = hypervisor.connect(
                host.uri,
                timeout=_setting("PREFLIGHT_CONNECT_TIMEOUT", 3.0),
                call_timeout=_setting("PREFLIGHT_CALL_TIMEOUT", 8.0),
            )
        except hypervisor.HypervisorError:
            return
        try:
            measure_dirty_rate(conn, host, vm.uuid)
        except hypervisor.HypervisorError:
            pass  # the checklist says why when it runs
        finally:
            conn.close()

    thread = threading.Thread(target=work, name=f"dirty-rate {vm.name}", daemon=True)
    thread.start()
    return thread


def _left_copies(host):
    """{path: LeftCopy} of the copies kvmweb recorded leaving on ``host``."""
    try:
        return {c.path: c for c in LeftCopy.objects.filter(host=host, removed_at=None)}
    except DatabaseError:  # no database (benchmark, command without migrate)
        return {}


def _link_bandwidth(ctx):
    """(MiB/s, how we know) of the source->target link: the median of what earlier
    uncapped migrations that ran alone between these hosts moved per second (bytes moved
    / time, recorded as ``result["link_mibs"]`` when they succeeded), else the configured
    assumption. A capped or concurrent job says nothing about the link and is never used."""
    try:
        results = list(
            MigrationJob.objects.filter(source=ctx.source, target=ctx.target, status=MigrationJob.SUCCEEDED)
            .order_by("-finished_at")
            .values_list("result", flat=True)[:50]
        )
    except DatabaseError:  # no database (benchmark, command without migrate): assume
        results = []
    rates = [r["link_mibs"] for r in results if (r or {}).get("link_mibs")][:10]
    if rates:
        return float(statistics.median(rates)), _(
            "the median rate of the last %(n)d uncapped migrations that ran alone between these hosts"
        ) % {"n": len(rates)}
    assumed = _setting("PREFLIGHT_ASSUMED_BANDWIDTH_MIBS", 117)
    return float(assumed), _(
        "assumed %(b)d MiB/s (about 1 Gbit/s; no earlier uncapped migration between these hosts to learn from)"
    ) % {"b": assumed}


def predict_precopy(memory, bandwidth, dirty, downtime_s, max_iterations=30):
    """Pre-copy model: pass 1 sends all memory M at bandwidth B; each next pass sends what
    was dirtied during the previous one (rate D); the guest is paused for the last pass
    once it fits in the allowed downtime. Returns a dict with converges, iterations,
    seconds and downtime_ms. Bytes and bytes/s in."""
    if bandwidth <= 0:
        return {"converges": False, "iterations": 0, "seconds": math.inf, "downtime_ms": None}
    remaining, total, iterations = float(memory), 0.0, 0
    while iterations < max_iterations:
        t = remaining / bandwidth
        iterations += 1
        total += t
        dirtied = min(dirty * t, float(memory))
        if dirtied / bandwidth <= downtime_s:
            stop = dirtied / bandwidth
            return {
                "converges": True,
                "iterations": iterations,
                "seconds": total + stop,
                "downtime_ms": round(stop * 1000 + 20),  # + device state, observed 15-80 ms
            }
        if dirty >= bandwidth:
            break
        remaining = dirtied
    return {"converges": False, "iterations": iterations, "seconds": math.inf, "downtime_ms": None}


def check_prediction(ctx):
    """Estimated duration and downtime, from the memory to send, the bandwidth (cap or
    link) and the measured dirty rate, with a verdict on convergence and advice."""
    dom = ctx.domain()
    g = ctx.guest()
    opts = ctx.options
    link, link_source = _link_bandwidth(ctx)
    cap = opts.get("bandwidth")
    bw_mib = min(link, cap) if cap else link
    details = {
        "memory_mib": _mib(dom["memory"]),
        "bandwidth_mib_s": round(bw_mib, 1),
        "bandwidth_source": _("the bandwidth cap of this plan") if cap and cap <= link else link_source,
    }
    if ctx.strategy.definition_only:
        return _result(
            "prediction",
            PASS,
            _("Only the definition moves: this takes milliseconds; the VM stays off."),
            details=details,
        )
    disk_bytes = 0
    if ctx.strategy.copies_disks:
        try:
            storage = ctx.storage("target")
            for d in g["disks"]:
                if d["device"] == "disk" and d["path"] and not storage.get(d["path"], {}).get("visible"):
                    sizes = dom["disk_sizes"].get(d["dev"], {})
                    disk_bytes += sizes.get("physical") or sizes.get("capacity") or 0
        except Unavailable:
            pass
    details["disk_copy_mib"] = _mib(disk_bytes)
    bw = bw_mib * MIB
    if ctx.strategy.shuts_down:
        seconds = disk_bytes / bw if bw else 0
        shutdown = opts.get("shutdown_timeout", 120) if dom["active"] else 0
        details["copy_seconds"] = round(seconds, 1)
        return _result(
            "prediction",
            PASS,
            _(
                "Downtime is the whole operation: shutdown (up to %(s)d s), copying %(m).1f MiB of disks (about %(c).1f s at %(b).0f MiB/s), defining and starting on the target."
            )
            % {"s": shutdown, "m": disk_bytes / MIB, "c": seconds, "b": bw_mib},
            details=details,
        )
    # Live modes: how much RAM will really travel (zero pages are skipped).
    memory = dom["memory"]
    if dom.get("rss"):
        memory = min(memory, dom["rss"])
        details["memory_source"] = _("resident memory of the QEMU process (zero pages are not sent)")
    else:
        details["memory_source"] = _("the VM's full memory size (upper bound)")
    details["memory_to_send_mib"] = _mib(memory)
    downtime_ms = opts.get("max_downtime") or QEMU_DEFAULT_DOWNTIME_MS
    details["max_downtime_ms"] = downtime_ms
    assumption = ""
    if dom["state"] != "running":
        dirty_mib = 0.0
        details["dirty_rate_source"] = _("the VM is paused: it dirties no memory")
    elif not ctx.measure_dirty_rate:
        dirty_mib = 0.0
        assumption = _("dirty rate not measured in a quick check (assumed 0: the estimate is a lower bound)")
        details["dirty_rate_source"] = assumption
    else:
        try:
            measured = measure_dirty_rate(ctx.need_conn("source"), ctx.source, ctx.vm.uuid)
            dirty_mib = float(measured["mib_per_s"])
            details["dirty_rate"] = measured
            details["dirty_rate_source"] = _("measured by libvirt over %(p)d s (%(m)s)") % {
                "p": measured["period"],
                "m": measured["mode"],
            }
        except hypervisor.HypervisorError as exc:
            dirty_mib = 0.0
            assumption = _(
                "dirty rate could not be measured (%(e)s); assumed 0, so the estimate is a lower bound"
            ) % {"e": exc.message}
            details["dirty_rate_source"] = assumption
    details["dirty_rate_mib_s"] = dirty_mib
    model = predict_precopy(memory, bw, dirty_mib * MIB, downtime_ms / 1000)
    copy_s = disk_bytes / bw if bw else 0
    details.update(
        iterations=model["iterations"],
        converges=model["converges"],
        estimated_seconds=None if not model["converges"] else round(model["seconds"] + copy_s, 2),
        estimated_downtime_ms=model["downtime_ms"],
        disk_copy_seconds=round(copy_s, 2),
    )
    facts = _("%(m)d MiB of RAM at %(b).0f MiB/s with a dirty rate of %(d).0f MiB/s") % {
        "m": _mib(memory),
        "b": bw_mib,
        "d": dirty_mib,
    }
    if disk_bytes:
        facts += _(", after copying %(c).1f MiB of disks (about %(s).1f s)") % {
            "c": disk_bytes / MIB,
            "s": copy_s,
        }
    if assumption:
        facts += f" ({assumption})"
    if not model["converges"]:
        advice = _(
            "Enable auto-converge (throttles the guest's CPU), raise or remove the bandwidth cap, allow a longer "
            "max downtime, enable post-copy, or migrate Cold."
        )
        if opts.get("postcopy") or opts.get("auto_converge"):
            how = _("post-copy") if opts.get("postcopy") else _("auto-converge")
            return _result(
                "prediction",
                WARN,
                _("Pre-copy alone will not converge (%(f)s); it relies on %(h)s to finish.")
                % {"f": facts, "h": how},
                advice,
                details,
            )
        return _result(
            "prediction",
            FAIL,
            _(
                "This migration will not converge: the guest dirties memory as fast as it can be sent (%(f)s). It would run until it is aborted."
            )
            % {"f": facts},
            advice,
            details,
            overridable=True,
        )
    total = model["seconds"] + copy_s
    message = _("About %(t).1f s, downtime about %(d)d ms, %(i)d pass(es): %(f)s.") % {
        "t": total,
        "d": model["downtime_ms"],
        "i": model["iterations"],
        "f": facts,
    }
    timeout = opts.get("completion_timeout")
    if timeout and total > timeout:
        return _result(
            "prediction",
            WARN,
            message
            + " "
            + _("That is longer than the completion timeout (%(c)d s), which will %(a)s.")
            % {"c": timeout, "a": opts.get("completion_action", "abort")},
            _("Raise the completion timeout or the bandwidth."),
            details,
        )
    if bw_mib and dirty_mib / bw_mib > 0.5:
        return _result(
            "prediction",
            WARN,
            message
            + " "
            + _("The dirty rate is more than half the bandwidth: it may not settle if the load grows."),
            _("Consider auto-converge, more bandwidth, or post-copy."),
            details,
        )
    return _result("prediction", PASS, message, details=details)


# ----------------------------------------------------------------------------- registry


def check_transport(ctx):
    """Which connection the peer-to-peer migration uses (the source's libvirtd opens the
    target's URI) and, for qemu+tls hosts, whether the client certificates are valid:
    expired or missing fails, expiring soon warns (hosts/transport.py)."""
    status, message, remedy, details = transport.migration_check(
        ctx.source, ctx.target, tunnelled=bool(ctx.options.get("tunnelled"))
    )
    return _result("transport", status, message, remedy, details)


# --- guest_shutdown (added with the cold move's countdown; a self-contained check) ------


def check_guest_shutdown(ctx):
    """A cold move asks the guest to shut down (ACPI power button, or the guest agent):
    warn when the definition shows no sign of either, since such a guest usually ignores
    the request and the move then waits the whole timeout (and fails unless forced off)."""
    if not ctx.strategy.shuts_down:
        return _result("guest_shutdown", PASS, _("Not needed: this mode does not shut the guest down."))
    dom = ctx.domain()
    if not dom["active"]:
        return _result("guest_shutdown", PASS, _("The VM is already shut off: nothing to shut down."))
    root = ET.fromstring(dom["xml"])
    acpi = root.find("features/acpi") is not None
    agent = any(
        (ch.find("target") is not None and ch.find("target").get("name") == "org.qemu.guest_agent.0")
        for ch in root.findall("devices/channel")
    )
    details = {"acpi": acpi, "guest_agent_channel": agent}
    if acpi or agent:
        how = _("ACPI") if acpi else _("the guest agent channel")
        return _result(
            "guest_shutdown",
            PASS,
            _("The guest can be asked to shut down (%(how)s).") % {"how": how},
            details=details,
        )
    forced = bool(ctx.options.get("force_off"))
    return _result(
        "guest_shutdown",
        WARN,
        _(
            "The definition has no <acpi/> feature and no guest agent channel: the guest will probably "
            "ignore the shutdown request, and the move waits %(timeout)s s."
        )
        % {"timeout": ctx.options.get("shutdown_timeout", 120)}
        + (
            " " + _("Then it is forced off (as checked).")
            if forced
            else " " + _("Then it fails: the VM stays on the source.")
        ),
        _(
            "Check “Force off when the guest does not shut down”, shut the guest down yourself first, or use “Force off now” on the running job."
        ),
        details,
    )


# --- end guest_shutdown -------------------------------------------------------------------


TITLES = {
    "connection": gettext_lazy("Connections"),
    "versions": gettext_lazy("libvirt and QEMU versions"),
    "same_host": gettext_lazy("Target is another host"),
    "vm_state": gettext_lazy("VM state fits the mode"),
    "plan": gettext_lazy("Migration options"),
    "jobs": gettext_lazy("No running job"),
    "cpu": gettext_lazy("CPU compatibility"),
    "machine": gettext_lazy("Machine type"),
    "vcpus": gettext_lazy("vCPU limit"),
    "memory": gettext_lazy("Free memory on the target"),
    "networks": gettext_lazy("Networks on the target"),
    "storage": gettext_lazy("Disks and storage"),
    "collision": gettext_lazy("No name or UUID collision"),
    "snapshots": gettext_lazy("Snapshots"),
    "devices": gettext_lazy("Migratable devices"),
    "firmware": gettext_lazy("UEFI variables and TPM"),
    "disk_cache": gettext_lazy("Disk cache mode"),
    "prediction": gettext_lazy("Duration and convergence"),
    "transport": gettext_lazy("Transport between the hosts"),
    "guest_shutdown": gettext_lazy("Guest can be shut down"),
}
# Display order. The slow one (the dirty-rate measurement) is submitted first so it
# overlaps with everything else.
CHECKS = [
    ("connection", check_connection),
    ("versions", check_versions),
    ("same_host", check_same_host),
    ("vm_state", check_vm_state),
    ("plan", check_plan),
    ("jobs", check_jobs),
    ("cpu", check_cpu),
    ("machine", check_machine),
    ("vcpus", check_vcpus),
    ("memory", check_memory),
    ("networks", check_networks),
    ("storage", check_storage),
    ("collision", check_collision),
    ("snapshots", check_snapshots),
    ("devices", check_devices),
    ("firmware", check_firmware),
    ("disk_cache", check_disk_cache),
    ("prediction", check_prediction),
    ("transport", check_transport),
    ("guest_shutdown", check_guest_shutdown),
]


def _run_one(check_id, fn, ctx, language=None):
    """Run one check; an Unavailable fact is a skip, a libvirt error a warning that says
    the check could not be done, anything else a failure (logged). Django's active
    language is per thread: the caller's is activated here so messages are in it."""
    with translation.override(language):
        return _run_one_inner(check_id, fn, ctx)


def _run_one_inner(check_id, fn, ctx):
    try:
        return fn(ctx)
    except Unavailable as exc:
        return _result(check_id, SKIP, str(exc))
    except hypervisor.HypervisorError as exc:
        return _result(
            check_id,
            WARN,
            _("Could not check: %(e)s") % {"e": exc.message},
            exc.remedy or _("Re-run the checklist; if it persists, check the host."),
            {"error": exc.message},
        )
    except Exception as exc:  # a bug in a check must not hide the other results
        log.exception("preflight check %s crashed", check_id)
        return _result(
            check_id,
            FAIL,
            _("The check itself failed: %(e)s") % {"e": exc},
            _("Report this to the kvmweb administrators."),
            {"error": repr(exc)},
            overridable=True,
        )


def run_preflight(plan, *, memory_margin_mib=None, measure_dirty_rate=True, timeout=None):
    """Run the whole checklist for ``plan`` (a MigrationPlan) and return a Report.

    Checks run concurrently; the run is bounded by ``timeout`` (KVMWEB_PREFLIGHT_TIMEOUT):
    a check still waiting then is a fail. Never raises for host problems."""
    if memory_margin_mib is None:
        memory_margin_mib = _setting("KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB", 256)
    timeout = timeout or _setting("PREFLIGHT_TIMEOUT", 20.0)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    ctx = Context(
        plan,
        memory_margin_mib=memory_margin_mib,
        deadline=t0 + timeout,
        measure_dirty_rate=measure_dirty_rate,
    )
    # Database facts are read here, on the caller's thread and connection (the checks
    # run on pool threads with connections of their own).
    ctx.left_copies = _left_copies(plan.target)
    order = [cid for cid, _fn in CHECKS]
    functions = dict(CHECKS)
    submit_order = ["prediction"] + [cid for cid in order if cid != "prediction"]
    results = {}
    pool = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="preflight")
    try:
        language = translation.get_language()
        futures = {cid: pool.submit(_run_one, cid, functions[cid], ctx, language) for cid in submit_order}
        for cid in order:
            try:
                results[cid] = futures[cid].result(timeout=max(0.0, ctx.deadline - time.monotonic()))
            except FutureTimeout:
                results[cid] = _result(
                    cid,
                    FAIL,
                    _("The check did not finish within %(t)g s.") % {"t": timeout},
                    _("A host is slow or hung: check libvirtd on both hosts, then re-run the checklist."),
                    overridable=True,
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        ctx.close()
    ordered = [results[cid] for cid in order]
    try:
        plan_dict = plan.to_dict()
    except Exception:  # a plan that cannot even render flags: still report
        plan_dict = {"mode": plan.mode, "options": plan.options}
    return Report(
        results=ordered,
        verdict=Report.verdict_of(ordered),
        started_at=started.isoformat(timespec="seconds"),
        duration_ms=round((time.monotonic() - t0) * 1000),
        plan=plan_dict,
    )


def rank_targets(vm, mode, options=None, user=None, *, measure_dirty_rate=False):
    """Every possible target host for ``vm`` (in the user's scope), with a quick report,
    best first: reachable hosts, then fewest fails, fewest warnings, most free memory. The quick
    variant skips the dirty-rate measurement; for live modes one starts in the background
    (prime_dirty_rate), ready when the chosen target gets the full run."""
    from hosts.models import Host

    if user is None:
        hosts = Host.objects.exclude(pk=vm.host_id)
    else:
        # Only targets this user may pick (a self-service policy's target groups), so the
        # wizard never offers a host that the request would then be refused for.
        from kvmweb.accounts.policy import allowed_targets

        hosts = allowed_targets(user, vm)
    hosts = list(hosts.exclude(maintenance=True))  # never offered as a target
    if not hosts or vm.host is None:
        return []
    if modes.get(mode).live:
        # The person is about to pick a target: measure the dirty rate meanwhile, so the
        # full checklist for the chosen target reuses it instead of waiting a second.
        prime_dirty_rate(vm)

    language = translation.get_language()

    def one(target):
        with translation.override(language):
            return one_in_language(target)

    def one_in_language(target):
        try:
            plan = MigrationPlan(vm=vm, source=vm.host, target=target, mode=mode, options=dict(options or {}))
        except PlanError as exc:
            result = CheckResult("plan", str(TITLES["plan"]), FAIL, str(exc))
            return target, Report([result], FAIL, datetime.now(UTC).isoformat(), 0, {})
        return target, run_preflight(plan, measure_dirty_rate=measure_dirty_rate)

    with ThreadPoolExecutor(max_workers=min(8, len(hosts)), thread_name_prefix="rank") as pool:
        ranked = list(pool.map(one, hosts))

    def key(item):
        host, report = item
        memory = report.result("memory")
        free = (memory.details.get("target_free_mib") or 0) if memory else 0
        connection = report.result("connection")
        unreachable = connection is None or connection.status == FAIL  # its checks were skipped
        return (unreachable, len(report.fails), len(report.warnings), -free, host.name)

    return sorted(ranked, key=key)

"""Lab guests: a 512-byte boot sector that keeps dirtying RAM and counting.

The guest (guest/dirtier.S) enters protected mode, fills FILL MiB of RAM with a pattern
(so a migration has real data to copy), then forever increments a 32-bit counter at
guest-physical 0x100000 and rewrites a HOT MiB working set every DELAY ms.  The host reads
the counter through the QEMU monitor; after a migration it keeps counting on the target
from the source's value, which proves RAM state moved rather than a fresh boot.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

from . import core
from .core import LabError

GUEST_SRC = Path(__file__).resolve().parent / "guest" / "dirtier.S"
COUNTER_ADDR = 0x100000
DISK_SIZE = 64 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


# --------------------------------------------------------------------------- build


def dirtier_bin() -> Path:
    """Build the dirtier boot sector from source (as --32, ld -m elf_i386) unless built."""
    src = GUEST_SRC.read_bytes()
    # Named by the source's hash: checkouts of different versions sharing one lab dir
    # (a CI clone next to the work tree) each get their own build, never each other's.
    out = core.LAB_DIR / f"dirtier-{hashlib.sha256(src).hexdigest()[:16]}.bin"
    if out.exists():
        return out
    core.LAB_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=core.LAB_DIR) as tmp:
        obj, binary = Path(tmp) / "dirtier.o", Path(tmp) / "dirtier.bin"
        for cmd in (
            ["as", "--32", "-o", str(obj), str(GUEST_SRC)],
            ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", str(binary), str(obj)],
        ):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise LabError(
                    f"building the lab guest failed: {' '.join(cmd[:2])}: {r.stderr.strip()[-200:]}"
                )
        data = binary.read_bytes()
        if len(data) != 512 or data[510:] != b"\x55\xaa" or b"DIRTPARM" not in data:
            raise LabError(f"built dirtier.bin is not a 512-byte boot sector ({len(data)} bytes)")
        os.replace(binary, out)  # atomic: concurrent builders never see half a file
    return out


def _tsc_mhz() -> float:
    for line in core._read("/proc/cpuinfo").splitlines():
        if line.startswith("cpu MHz"):
            with contextlib.suppress(ValueError):
                return float(line.split(":")[1])
    return 2600.0


def boot_sector(fill_mib: int = 32, hot_mib: float = 1, delay_ms: float = 100) -> bytes:
    """The dirtier with its parameters patched in (pages of 4 KiB, delay in TSC cycles)."""
    bs = bytearray(dirtier_bin().read_bytes())
    off = bs.index(b"DIRTPARM") + 8
    delay = min(int(delay_ms * _tsc_mhz() * 1000), 2**32 - 1)
    struct.pack_into("<III", bs, off, int(fill_mib * 256), int(hot_mib * 256), delay)
    return bytes(bs)


def make_disk(path: Path, **params) -> None:
    """Write a qcow2 image at path whose first sector is the patched dirtier."""
    path = Path(path)
    tmp_raw = path.with_name(f".{path.name}.raw")
    tmp_qcow = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp_raw, "wb") as fh:
            fh.write(boot_sector(**params))
            fh.truncate(DISK_SIZE)  # sparse: qemu-img copies only the boot sector's cluster
        r = subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(tmp_raw), str(tmp_qcow)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise LabError(f"qemu-img failed for {path}: {r.stderr.strip()[-200:]}")
        os.replace(tmp_qcow, path)
    finally:
        tmp_raw.unlink(missing_ok=True)
        tmp_qcow.unlink(missing_ok=True)


# What libvirt's dirty-rate measurement (page-sampling, what kvmweb's preflight uses) sees
# of a guest: QEMU samples 512 random pages per GiB for a second, so each sampled page
# that changed stands for 2 MiB/s. The default guest rewrites 256 pages (1 MiB), 0.5
# sampled hits on average: of 37 measurements (most with two CPU burners) 17 read 0,
# 15 read 2 and 5 read 4 MiB/s. The 64-page slow guest (hot_mib=0.25, delay_ms=500) read
# 0 x33, 2 x3 and 4 x1. A preflight that measures refuses a bandwidth cap at or below the
# reading as non-converging and warns when the reading is over half the cap.
# QUIET rewrites no working set: only the counter page and the sleep's stack page change
# (a reading of 2 MiB/s needs one of them sampled, ~0.4 % of runs; 4 needs both, ~1e-5),
# so a migration capped at 4 MiB/s or more is never refused for its dirty rate. It
# still fills fill_mib of RAM, which is what a migration spends its time copying.
QUIET = {"hot_mib": 0, "delay_ms": 500}


# --------------------------------------------------------------------------- domains


def domain_xml(name: str, disk: str, virt: str, memory_mib: int = 128) -> str:
    """Minimal migratable guest: no NIC, no graphics, pty serial, cache='none' disk."""
    return f"""<domain type='{virt}'>
  <name>{escape(name)}</name>
  <description>kvmweb lab guest (dirtier boot sector)</description>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{escape(disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


_conns: dict = {}


def conn(host: str):
    """A cached, live libvirt connection to a lab host (reopened when it died)."""
    libvirt = core._libvirt()
    c = _conns.get(host)
    if c is not None:
        with contextlib.suppress(libvirt.libvirtError):
            if c.isAlive():
                return c
    try:
        c = libvirt.open(core.uri(host))
    except libvirt.libvirtError as e:
        raise LabError(f"{host} ({core.uri(host)}) is not reachable: {e.get_error_message()}") from None
    _conns[host] = c
    return c


def _forget_conns() -> None:
    for c in _conns.values():
        with contextlib.suppress(Exception):
            c.close()
    _conns.clear()


# Close cached connections before interpreter teardown (a virConnect collected that late
# raises "NoneType is not callable" from its __del__).
atexit.register(_forget_conns)


def _refresh_pools(host: str) -> None:
    libvirt = core._libvirt()
    for pool_name in ("shared", "images"):
        with contextlib.suppress(libvirt.libvirtError):
            pool = conn(host).storagePoolLookupByName(pool_name)
            if pool.isActive():
                pool.refresh(0)


def virt_type(host: str = "lab-a") -> str:
    """'kvm' when KVM really starts a guest here, else 'qemu' (TCG).

    Decided once per lab by starting a throwaway guest (virt-host-validate is no oracle:
    it says FAIL on these nested machines where KVM works).  KVMWEB_LAB_VIRT overrides."""
    forced = os.environ.get("KVMWEB_LAB_VIRT")
    if forced in ("kvm", "qemu"):
        return forced
    cached = core._read(core.LAB_DIR / "virt")
    kvm_usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    if cached == "qemu" or (cached == "kvm" and kvm_usable):
        return cached
    virt = "qemu"
    if kvm_usable:
        libvirt = core._libvirt()
        probe = f"kvmweb-lab-probe-{os.getpid()}"
        # No disk: SeaBIOS just reports "no bootable device"; starting is all we test.
        xml = re.sub(r"\s*<disk .*?</disk>", "", domain_xml(probe, "", "kvm", 16), flags=re.S)
        try:
            conn(host).createXML(xml, 0).destroy()
            virt = "kvm"
        except libvirt.libvirtError:
            virt = "qemu"
    (core.LAB_DIR / "virt").write_text(virt + "\n")
    return virt


def _find(name: str) -> list[tuple[str, object]]:
    """(host, domain) for every running lab host that has a domain of this name."""
    libvirt = core._libvirt()
    found = []
    for host in core.running_hosts():
        try:
            found.append((host, conn(host).lookupByName(name)))
        except libvirt.libvirtError:
            pass
        except LabError:
            pass
    return found


def where(name: str) -> dict:
    """{host: 'running' | 'shut off'} for every running lab host that defines this guest."""
    return {host: ("running" if dom.isActive() else "shut off") for host, dom in _find(name)}


def start_guest(name: str, host: str) -> None:
    """Start a defined, shut-off guest on a lab host (no-op when it already runs)."""
    dom = conn(host).lookupByName(name)
    if not dom.isActive():
        dom.create()


def disk_path(name: str, storage: str, host: str) -> tuple[Path, str]:
    """(path in the root namespace, path inside the lab host) of a guest's disk."""
    if storage == "shared":
        return core.shared_dir() / f"{name}.qcow2", f"{core.SHARED_IN_HOST}/{name}.qcow2"
    if storage == "local":
        return core.local_dir(host) / f"{name}.qcow2", f"{core.LOCAL_IN_HOST}/{name}.qcow2"
    raise LabError(f"storage must be 'shared' or 'local', got {storage!r}")


def create_guest(
    name: str,
    host: str = "lab-a",
    storage: str = "shared",
    running: bool = True,
    memory_mib: int = 128,
    fill_mib: int = 32,
    hot_mib: float = 1,
    delay_ms: float = 100,
) -> str:
    """Define (and by default start) a dirtier guest on a lab host; returns its UUID.

    storage='shared' puts the disk on the shared pool (every host sees it), 'local' on the
    host's own images pool.  Refuses a name that already exists anywhere in the lab."""
    libvirt = core._libvirt()
    if not NAME_RE.match(name or ""):
        raise LabError(f"bad guest name {name!r} (letters, digits, . _ -)")
    if fill_mib + 3 > memory_mib:
        raise LabError(f"fill_mib={fill_mib} does not fit in memory_mib={memory_mib}")
    if not core._host_running(host):
        raise LabError(f"{host} is not running (start the lab: labctl up)")
    existing = _find(name)
    if existing:
        raise LabError(f"a guest named {name!r} already exists on {existing[0][0]}")
    root_path, host_path = disk_path(name, storage, host)
    make_disk(root_path, fill_mib=fill_mib, hot_mib=hot_mib, delay_ms=delay_ms)
    for h in core.running_hosts() if storage == "shared" else [host]:
        _refresh_pools(h)  # so storageVolLookupByPath() finds the new volume
    virt = virt_type(host)
    dom = conn(host).defineXML(domain_xml(name, host_path, virt, memory_mib))
    if running:
        try:
            dom.create()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
            raise
    return dom.UUIDString()


def remove_guest(name: str) -> None:
    """Destroy and undefine the guest on every lab host; delete its disk files everywhere."""
    libvirt = core._libvirt()
    for _host, dom in _find(name):
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            )
    # Through the FUSE mount when it is up, so the kernel's dentry cache stays truthful.
    shared = core.shared_dir() if core._shared_healthy() else core.LAB_DIR / "shared-backing"
    paths = [shared / f"{name}.qcow2"]
    paths += [core.local_dir(h) / f"{name}.qcow2" for h in core.HOST_NAMES]
    removed = False
    for p in paths:
        if p.exists():
            p.unlink()
            removed = True
    if removed:
        for h in core.running_hosts():
            _refresh_pools(h)


# ---------------------------------------------------------------- guests owned by sessions
#
# A test session that is killed never runs its fixture teardown, and its guests would stay
# in the shared lab forever.  The lab_guest fixture therefore records each guest it makes
# under $LAB_DIR/owned/<name> with its process id and start time; sweep_orphans() removes
# guests whose owning process is gone.  Guests made by people (labctl, lab_demo) are never
# recorded, so never swept.


def _owned_dir() -> Path:
    return core.LAB_DIR / "owned"


def claim(name: str) -> None:
    """Record that this process owns the guest (see sweep_orphans)."""
    _owned_dir().mkdir(parents=True, exist_ok=True)
    tmp = _owned_dir() / f".{name}.{os.getpid()}"
    tmp.write_text(f"{os.getpid()} {core._starttime(os.getpid())}\n")
    os.replace(tmp, _owned_dir() / name)  # atomic: a concurrent sweep never reads it half-written


def release(name: str) -> None:
    (_owned_dir() / name).unlink(missing_ok=True)


def sweep_orphans() -> list[str]:
    """Remove guests whose owning test session died; returns their names."""
    swept = []
    if not _owned_dir().is_dir():
        return swept
    stopped = [h for h in core.HOST_NAMES if core.host_dir(h).exists() and not core._host_running(h)]
    for entry in _owned_dir().iterdir():
        if entry.name.startswith("."):
            continue  # a claim being written
        fields = core._read(entry).split()
        pid = int(fields[0]) if fields and fields[0].isdigit() else 0
        if pid and core._alive(pid) and core._starttime(pid) == (fields[1] if len(fields) > 1 else ""):
            continue  # its session is still running
        remove_guest(entry.name)
        swept.append(entry.name)
        # A stopped host may still hold the persistent definition: retry on a later sweep.
        if not any((core.host_dir(h) / "etc" / "qemu" / f"{entry.name}.xml").exists() for h in stopped):
            entry.unlink(missing_ok=True)
    return swept


def read_counter(host: str, name: str) -> int:
    """The guest's counter (guest-physical 0x100000), read through the QEMU monitor.

    virDomainMemoryPeek needs only a query job, so it also answers while a migration is
    running (a raw HMP command needs a modify job and would wait for the migration)."""
    libvirt = core._libvirt()
    dom = conn(host).lookupByName(name)
    try:
        raw = dom.memoryPeek(COUNTER_ADDR, 4, libvirt.VIR_MEMORY_PHYSICAL)
        return struct.unpack("<I", bytes(raw))[0]
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
    import libvirt_qemu

    out = libvirt_qemu.qemuMonitorCommand(
        dom, f"xp /1wx {COUNTER_ADDR:#x}", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    return int(out.strip().split()[-1], 16)


def wait_counter_moves(host: str, name: str, timeout: float = 60) -> int:
    """Wait until the guest's counter is non-zero and increments; returns the last value."""
    deadline = time.monotonic() + timeout
    first = read_counter(host, name)
    while True:
        value = read_counter(host, name)
        if value > first and value > 0:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"counter of {name} on {host} did not move in {timeout} s (stuck at {value})")
        time.sleep(0.03)

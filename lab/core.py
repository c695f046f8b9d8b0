"""Simulated libvirt hosts on this one machine: start, stop, inspect.

Each lab host is a mount+UTS namespace (its own hostname, /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and /etc/hosts) whose only
long-lived processes are `tini -s` (a subreaper) and a monolithic libvirtd listening on
the host's own loopback address.  Shared storage is one bindfs FUSE mount with the
`glusterfs` subtype (libvirt then treats it as a cluster filesystem and allows live
migration without --unsafe), bind-mounted at /var/lib/libvirt/shared in every host.

Process identity: a PID file alone proves nothing after a crash (the number may belong to
someone else by now).  A process is the lab's only when its comm matches AND it lives in
that host's mount namespace, which we prove by `/proc/PID/root/run/libvirt` being the very
directory `$LAB_DIR/<host>/run` (same device and inode).  Nothing that fails this check is
ever signalled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path

LAB_DIR = Path(os.environ.get("KVMWEB_LAB_DIR", "/var/tmp/kvmweb-lab"))
# First three octets of the hosts' addresses.  A second, independent lab (a benchmark, a
# CI clone) can run next to the shared one with its own KVMWEB_LAB_DIR and e.g. 127.0.9.
LAB_NET = os.environ.get("KVMWEB_LAB_NET", "127.0.0")
HOST_NAMES = ["lab-a", "lab-b", "lab-c", "lab-d"]
DOMAIN = "lab.test"
LIBVIRTD_PORT = 16509
LIBVIRTD_TLS_PORT = 16514
TRANSPORTS = ("tcp", "tls", "ssh")
MIGRATION_PORT_BASE = 49152  # each host gets its own block of MIGRATION_PORTS_PER_HOST
MIGRATION_PORTS_PER_HOST = 32
SHARED_IN_HOST = "/var/lib/libvirt/shared"
LOCAL_IN_HOST = "/var/lib/libvirt/images"
LIBVIRTD = "/usr/sbin/libvirtd"
# Mount points in the root namespace that the per-host bind mounts cover.
_MOUNT_POINTS = ["/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class LabError(Exception):
    """A lab problem a person can act on; the CLI prints it as one line."""


def _libvirt():
    """Import libvirt with its stderr error printer silenced (errors still raise)."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


# --------------------------------------------------------------------------- names


def _index(name: str) -> int:
    try:
        return HOST_NAMES.index(name)
    except ValueError:
        raise LabError(f"unknown lab host {name!r} (known: {', '.join(HOST_NAMES)})") from None


def ip(name: str) -> str:
    """Loopback address of a lab host: lab-a -> 127.0.0.2, lab-b -> 127.0.0.3, ..."""
    parts = LAB_NET.split(".")
    if len(parts) != 3 or parts[0] != "127" or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise LabError(f"KVMWEB_LAB_NET must be three octets inside 127/8, like 127.0.9 (got {LAB_NET!r})")
    return f"{LAB_NET}.{_index(name) + 2}"


def uri(name: str, transport: str = "tcp", client: str = "client") -> str:
    """libvirt URI of a lab host.  ``tcp``: no auth (loopback lab only); ``tls``: the
    lab CA's certificates, ``pkipath`` naming a client directory (lab/pki.py: ``client``,
    or ``client-expired`` / ``client-foreign`` to provoke the failures)."""
    if transport == "tcp":
        return f"qemu+tcp://{ip(name)}/system"
    if transport == "tls":
        from . import pki

        return f"qemu+tls://{ip(name)}/system?pkipath={pki.client_dir(LAB_DIR, client)}"
    if transport == "ssh":
        from . import sshd

        # libssh2: an SSH transport of libvirt that takes known_hosts from the URI (qemu+ssh
        # runs the ssh binary, which reads ~/.ssh/known_hosts of the user; qemu+libssh
        # stalls each reply over ~4 KiB until the next keepalive, 5 s).
        return (
            f"qemu+libssh2://root@{ip(name)}/system?keyfile={sshd.client_key(LAB_DIR)}"
            f"&known_hosts={sshd.known_hosts(LAB_DIR)}"
        )
    raise LabError(f"unknown transport {transport!r} (known: {', '.join(TRANSPORTS)})")


def tls_ready(name: str, timeout: float = 1.0) -> bool:
    """True when the host's libvirtd TLS listener accepts connections."""
    return _port_open(name, timeout, LIBVIRTD_TLS_PORT)


def require_tls(names) -> None:
    """Raise LabError unless every host in ``names`` listens for TLS: a lab started by code
    that predates the TLS listener keeps running without it until `make lab-down`."""
    missing = [h for h in names if not tls_ready(h)]
    if missing:
        raise LabError(
            f"{', '.join(missing)}: libvirtd has no TLS listener on :{LIBVIRTD_TLS_PORT} (the running lab was "
            "started by older lab code); stop it with `make lab-down` when nobody uses it"
        )


def _sshd_pid(name: str) -> int:
    """PID of the host's own sshd (verified: comm and namespace), or 0."""
    from . import sshd

    pid = _pid_from(sshd.host_ssh_dir(host_dir(name)) / "sshd.pid")
    return pid if pid and _alive(pid) and _comm(pid) == "sshd" and _in_host_ns(pid, name) else 0


def ssh_ready(name: str, timeout: float = 1.0) -> bool:
    """True when the host's sshd runs and accepts connections on port 22."""
    from . import sshd

    return bool(_sshd_pid(name)) and _port_open(name, timeout, sshd.SSH_PORT)


def require_ssh(names) -> None:
    """Raise LabError unless every host in ``names`` runs its sshd (one line: why not)."""
    from . import sshd

    reason = sshd.missing_reason()
    if reason:
        raise LabError(reason)
    missing = [h for h in names if not ssh_ready(h)]
    if missing:
        raise LabError(
            f"{', '.join(missing)}: no lab sshd on :{sshd.SSH_PORT}: {sshd.failure(host_dir(missing[0]))}"
        )


def start_sshd(names) -> None:
    """Start the sshd of running hosts that have none (idempotent); LabError when one
    does not come up.  Also used by up(), so a lab started by older code gains sshd
    without restarting libvirtd or its guests."""
    from . import sshd

    if sshd.missing_reason():
        return
    if not os.path.isdir(sshd.PRIVSEP_DIR):
        os.makedirs(sshd.PRIVSEP_DIR, mode=0o755)
        created = set(_read(LAB_DIR / "created-mountpoints").split()) | {sshd.PRIVSEP_DIR}
        (LAB_DIR / "created-mountpoints").write_text("\n".join(sorted(created)) + "\n")  # down removes it
    procs = {}
    for name in names:
        pids = _host_pids(name)
        if not pids["libvirtd"] or _sshd_pid(name):
            continue
        sshd.write_config(LAB_DIR, name, host_dir(name), ip(name))
        procs[name] = sshd.spawn(LAB_DIR, host_dir(name), pids["libvirtd"])
    failed = sshd.wait_listening(procs, _port_open, READY_TIMEOUT)
    if failed:
        raise LabError(f"{failed[0]}: sshd did not start: {sshd.failure(host_dir(failed[0]))}")


def _start_sshd_quietly(names) -> None:
    """sshd is for the SSH tests only: a failure (port 22 taken by a system sshd on
    0.0.0.0, say) must not take the lab from everyone else; require_ssh() names it."""
    with contextlib.suppress(LabError, OSError, subprocess.SubprocessError):
        start_sshd(names)


def stop_sshd(name: str) -> bool:
    """Stop one host's sshd (verified PID); True when one was running.  Tests use it to
    provoke "sshd down"; start_sshd() brings it back."""
    pid = _sshd_pid(name)
    if not pid:
        return False
    _kill_verified(pid, lambda p: _comm(p) == "sshd" and _in_host_ns(p, name))
    if _wait_gone([pid], STOP_TIMEOUT):
        _kill_verified(pid, lambda p: _comm(p) == "sshd" and _in_host_ns(p, name), signal.SIGKILL)
        _wait_gone([pid], 2.0)
    return True


def authorize_ssh_key(public_line: str, names=None) -> None:
    """Authorise a public key (kvmweb's, in tests) for root on lab hosts; only adds."""
    from . import sshd

    for name in names or HOST_NAMES:
        if (sshd.host_ssh_dir(host_dir(name))).is_dir():
            sshd.authorize(host_dir(name), public_line)


def ssh_host_key(name: str) -> str:
    """'ssh-ed25519 AAAA...' of a lab host (what its sshd presents)."""
    from . import sshd

    return sshd.host_public_key(host_dir(name))


def fqdn(name: str) -> str:
    return f"{name}.{DOMAIN}"


def migration_ports(name: str) -> tuple[int, int]:
    lo = MIGRATION_PORT_BASE + _index(name) * MIGRATION_PORTS_PER_HOST
    return lo, lo + MIGRATION_PORTS_PER_HOST - 1


def host_dir(name: str) -> Path:
    _index(name)
    return LAB_DIR / name


def shared_dir() -> Path:
    """The FUSE mount (root namespace view) that every host sees as SHARED_IN_HOST."""
    return LAB_DIR / "shared"


def local_dir(name: str) -> Path:
    """Root-namespace view of a host's LOCAL_IN_HOST directory."""
    return host_dir(name) / "lib" / "images"


def _host_count(n: int) -> int:
    if not isinstance(n, int) or not 1 <= n <= len(HOST_NAMES):
        raise LabError(f"host count must be 1..{len(HOST_NAMES)}, got {n!r}")
    return n


# --------------------------------------------------------------------------- processes


def _read(path, default=""):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm")


def _cmdline(pid: int) -> list[str]:
    raw = _read(f"/proc/{pid}/cmdline")
    return [a for a in raw.split("\0") if a]


def _starttime(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat")
    # comm may contain spaces/parens: fields start after the last ')'.
    return stat.rsplit(")", 1)[-1].split()[19] if ")" in stat else ""


def _alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}") and "State:\tZ" not in _read(f"/proc/{pid}/status")


def _in_host_ns(pid: int, name: str) -> bool:
    """True when PID's mount namespace has this host's run dir at /run/libvirt."""
    try:
        return os.path.samefile(f"/proc/{pid}/root/run/libvirt", host_dir(name) / "run")
    except OSError:
        return False


def _pid_from(path: Path) -> int:
    txt = _read(path).split()
    return int(txt[0]) if txt and txt[0].isdigit() else 0


def _host_pids(name: str) -> dict:
    """Verified lab processes of one host: {'tini': pid|0, 'libvirtd': pid|0}."""
    hd = host_dir(name)
    out = {"tini": 0, "libvirtd": 0}
    pid = _pid_from(hd / "tini.pid")
    if pid and _alive(pid) and _comm(pid) == "tini" and _in_host_ns(pid, name):
        out["tini"] = pid
    pid = _pid_from(hd / "run" / "libvirtd.pid")
    if pid and _alive(pid) and _comm(pid) == "libvirtd" and _in_host_ns(pid, name):
        out["libvirtd"] = pid
    return out


def _ns_processes(name: str) -> list[int]:
    """Every live process proven to be inside this host's namespace (leftover sweep)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _in_host_ns(int(entry), name):
            found.append(int(entry))
    return found


def _kill_verified(pid: int, check, sig=signal.SIGTERM) -> bool:
    """Signal PID only if check(pid) still holds right now (shrinks the PID-reuse window)."""
    if pid and _alive(pid) and check(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
    return False


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _alive(p)]
    return left


# --------------------------------------------------------------------------- checks


def skip_reason() -> str | None:
    """Why lab tests cannot run here at all (None when they can)."""
    if os.geteuid() != 0:
        return "the KVM lab needs root (simulated hosts use mount namespaces and FUSE)"
    if not os.path.exists(LIBVIRTD):
        return f"{LIBVIRTD} is absent (install libvirt-daemon-system; `make setup` does it)"
    return None


def check_prerequisites() -> None:
    """Raise LabError with a one-line, actionable message when the lab cannot start."""
    reason = skip_reason()
    if reason:
        raise LabError(reason)
    tools = {
        "unshare": "util-linux",
        "tini": "tini",
        "bindfs": "bindfs",
        "fusermount3": "fuse3",
        "qemu-img": "qemu-utils",
        "qemu-system-x86_64": "qemu-system-x86",
        "as": "binutils",
        "ld": "binutils",
    }
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if missing:
        raise LabError(f"missing lab packages: {' '.join(missing)} (run `make setup` as root)")
    if not os.path.exists("/dev/fuse"):
        raise LabError("FUSE is unavailable (/dev/fuse is missing): shared storage needs bindfs")


def _check_namespaces() -> None:
    r = subprocess.run(
        ["unshare", "--mount", "--uts", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise LabError(f"mount/UTS namespaces are unavailable: {msg[-1] if msg else r.returncode}")


def _socket_owner(port_ip: str, port: int) -> str:
    """Best effort 'pid N (comm)' of whoever listens on ip:port, from /proc/net/tcp."""
    want = f"{int.from_bytes(socket.inet_aton(port_ip), 'little'):08X}:{port:04X}"
    inode = None
    for line in _read("/proc/net/tcp").splitlines()[1:]:
        f = line.split()
        if f[1] in (want, f"00000000:{port:04X}") and f[3] == "0A":
            inode = f[9]
            break
    if not inode:
        return "unknown process"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == f"socket:[{inode}]":
                        return f"pid {entry} ({_comm(int(entry))})"
    return "unknown process"


def _check_port_free(name: str) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ip(name), LIBVIRTD_PORT))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LabError(
                f"{ip(name)}:{LIBVIRTD_PORT} (for {name}) is taken by "
                f"{_socket_owner(ip(name), LIBVIRTD_PORT)}, not by a kvmweb lab daemon: stop it first"
            ) from None
        raise LabError(f"cannot bind {ip(name)}:{LIBVIRTD_PORT}: {e.strerror}") from None
    finally:
        s.close()


def _port_open(name: str, timeout: float = 1.0, port: int = LIBVIRTD_PORT) -> bool:
    try:
        with socket.create_connection((ip(name), port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- lock, state


@contextlib.contextmanager
def _locked():
    """Serialise up/down across processes (several test sessions may share the lab)."""
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    with open(LAB_DIR / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of the root namespace, octal escapes decoded."""
    out = []
    for line in _read("/proc/self/mounts").splitlines():
        f = line.split()
        if len(f) >= 3:
            out.append((f[1].encode().decode("unicode_escape"), f[2]))
    return out


def _is_mounted(path: Path) -> bool:
    return any(mp == str(path) for mp, _ in _mounts())


# --------------------------------------------------------------------------- shared storage


def _bindfs_pid() -> int:
    pid = _pid_from(LAB_DIR / "bindfs.pid")
    if pid and _alive(pid) and _comm(pid) == "bindfs" and str(shared_dir()) in _cmdline(pid):
        return pid
    return 0


def _shared_healthy() -> bool:
    if not _is_mounted(shared_dir()):
        return False
    try:
        os.stat(shared_dir())
        os.listdir(shared_dir())
        return True
    except OSError:  # ENOTCONN: "Transport endpoint is not connected" after bindfs died
        return False


def _unmount_shared() -> None:
    sd = shared_dir()
    if _is_mounted(sd):
        r = subprocess.run(["fusermount3", "-u", str(sd)], capture_output=True)
        if r.returncode != 0 and _is_mounted(sd):
            # Busy or dead endpoint: detach lazily; nothing of ours can be using it any more.
            subprocess.run(["umount", "-l", str(sd)], capture_output=True)
    pid = _bindfs_pid()
    if pid and _wait_gone([pid], 2.0):
        _kill_verified(pid, lambda p: _comm(p) == "bindfs" and str(sd) in _cmdline(p), signal.SIGKILL)
    (LAB_DIR / "bindfs.pid").unlink(missing_ok=True)


def _ensure_shared() -> None:
    sd, backing = shared_dir(), LAB_DIR / "shared-backing"
    if _shared_healthy():
        return
    _unmount_shared()  # clears a stale "Transport endpoint is not connected" mount
    sd.mkdir(parents=True, exist_ok=True)
    backing.mkdir(parents=True, exist_ok=True)
    log = open(LAB_DIR / "bindfs.out", "ab")
    # -f keeps bindfs in the foreground so we know its PID; the subtype makes the mount
    # "fuse.glusterfs", which libvirt's virFileIsSharedFS() accepts as shared storage.
    proc = subprocess.Popen(
        ["bindfs", "-f", "-o", "subtype=glusterfs", str(backing), str(sd)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    (LAB_DIR / "bindfs.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = _read(LAB_DIR / "bindfs.out").splitlines()
            raise LabError(
                f"FUSE/bindfs failed to mount shared storage: {err[-1] if err else proc.returncode}"
            )
        if _shared_healthy():
            return
        time.sleep(0.01)
    raise LabError("FUSE/bindfs did not mount shared storage within 5 s")


# --------------------------------------------------------------------------- one host


def _write_host_config(name: str) -> None:
    hd = host_dir(name)
    for sub in ("etc", "run", "lib/images", "lib/shared", "log", "cache"):
        (hd / sub).mkdir(parents=True, exist_ok=True)
    if not (hd / "etc" / ".seeded").exists():
        # The packaged config minus autostarted networks: only qemu/ and nwfilter/ matter.
        shutil.copytree("/etc/libvirt", hd / "etc", dirs_exist_ok=True, symlinks=True)
        autostart = hd / "etc" / "qemu" / "networks" / "autostart"
        if autostart.is_dir():
            for f in autostart.iterdir():
                f.unlink()
        (hd / "etc" / ".seeded").touch()
    uuid_file = hd / "host_uuid"
    if not _read(uuid_file):  # distinct and stable per host (libvirt refuses same-UUID migration)
        uuid_file.write_text(f"{uuidlib.uuid4()}\n")
    from . import pki

    pki.ensure(LAB_DIR, {name: (ip(name), fqdn(name))})
    tls = pki.pki_dir(LAB_DIR) / name
    lo, hi = migration_ports(name)
    (hd / "etc" / "libvirtd.conf").write_text(
        "# Written by kvmweb lab (lab/core.py); TCP without auth: loopback lab only.\n"
        "# TLS: certificates of the lab CA (lab/pki.py); clients must present one it signed.\n"
        "listen_tls = 1\n"
        "listen_tcp = 1\n"
        f'listen_addr = "{ip(name)}"\n'
        f'tcp_port = "{LIBVIRTD_PORT}"\n'
        f'tls_port = "{LIBVIRTD_TLS_PORT}"\n'
        'auth_tcp = "none"\n'
        'auth_tls = "none"\n'
        f'ca_file = "{pki.pki_dir(LAB_DIR) / "ca" / "cacert.pem"}"\n'
        f'cert_file = "{tls / "servercert.pem"}"\n'
        f'key_file = "{tls / "serverkey.pem"}"\n'
        'auth_unix_ro = "none"\n'
        'auth_unix_rw = "none"\n'
        f'host_uuid = "{_read(uuid_file)}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    )
    (hd / "etc" / "qemu.conf").write_text(
        "# Written by kvmweb lab (lab/core.py).\n"
        'user = "root"\n'
        'group = "root"\n'
        "remember_owner = 0\n"
        'security_driver = "none"\n'
        "cgroup_controllers = [ ]\n"
        'stdio_handler = "file"\n'
        f'migration_address = "{ip(name)}"\n'
        f'migration_host = "{ip(name)}"\n'
        f"migration_port_min = {lo}\n"
        f"migration_port_max = {hi}\n"
        "# Native TLS migration (VIR_MIGRATE_TLS / virsh migrate --tls): the lab CA's files.\n"
        f'default_tls_x509_cert_dir = "{tls / "qemu"}"\n'
        "default_tls_x509_verify = 1\n"
    )


def _write_hosts_file() -> None:
    lines = ["127.0.0.1 localhost"] + [f"{ip(h)} {fqdn(h)} {h}" for h in HOST_NAMES]
    (LAB_DIR / "hosts").write_text("\n".join(lines) + "\n")


def _ensure_mount_points() -> None:
    created = set(_read(LAB_DIR / "created-mountpoints").split())
    for mp in _MOUNT_POINTS:
        if not os.path.isdir(mp):
            os.makedirs(mp)
            created.add(mp)  # remembered so `down` removes only what the lab created
    if created:
        (LAB_DIR / "created-mountpoints").write_text("\n".join(sorted(created)) + "\n")


def _clear_stale(name: str) -> None:
    """Before a cold start: end verified leftovers of a dead lab host and wipe its runtime."""
    _stop_host(name, graceful=False)
    run = host_dir(name) / "run"
    if run.is_dir():
        # Only runtime state lives here (PID files, sockets, status XML of dead guests).
        for entry in run.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _spawn(name: str) -> subprocess.Popen:
    hd = host_dir(name)
    script = "\n".join(
        [
            "set -e",
            f"hostname {fqdn(name)}",
            f"mount --bind '{hd}/etc' /etc/libvirt",
            f"mount --bind '{hd}/run' /run/libvirt",
            f"mount --bind '{hd}/lib' /var/lib/libvirt",
            f"mount --bind '{shared_dir()}' {SHARED_IN_HOST}",
            f"mount --bind '{hd}/log' /var/log/libvirt",
            f"mount --bind '{hd}/cache' /var/cache/libvirt",
            f"mount --bind '{LAB_DIR}/hosts' /etc/hosts",
            f"exec {LIBVIRTD} --listen --config /etc/libvirt/libvirtd.conf"
            " --pid-file /run/libvirt/libvirtd.pid",
        ]
    )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    log = open(hd / "daemon.out", "ab")
    # unshare execs tini (no --fork), so Popen's PID is tini's.  tini -s is a subreaper:
    # libvirt double-forks QEMU, and without a subreaper the orphan goes to PID 1, which on
    # these machines reaps about 1 s late; libvirt waits for that zombie on every destroy
    # and migration (1.2-1.6 s each).
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "tini",
            "-s",
            "--",
            "/bin/bash",
            "-c",
            script,
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        cwd="/",
        start_new_session=True,  # survives the CLI or the test session that started it
    )
    log.close()
    (hd / "tini.pid").write_text(f"{proc.pid}\n")
    return proc


def _daemon_failure(name: str) -> str:
    hd = host_dir(name)
    lines = (_read(hd / "daemon.out") + "\n" + _read(hd / "log" / "libvirtd.log")).strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][-300:]


def _wait_ready(procs: dict) -> None:
    libvirt = _libvirt()

    deadline = time.monotonic() + READY_TIMEOUT
    pending = dict(procs)
    while pending:
        for name, proc in list(pending.items()):
            if proc.poll() is not None:
                raise LabError(f"{name}: libvirtd exited during start: {_daemon_failure(name)}")
            if _port_open(name, 0.05):
                try:
                    libvirt.open(uri(name)).close()
                    del pending[name]
                except libvirt.libvirtError:
                    pass
        if pending and time.monotonic() > deadline:
            raise LabError(f"{', '.join(pending)}: libvirtd not answering after {READY_TIMEOUT:.0f} s")
        if pending:
            time.sleep(0.02)


def _pool_xml(name: str, path: str) -> str:
    return f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"


def _ensure_pools(name: str) -> None:
    libvirt = _libvirt()

    conn = libvirt.open(uri(name))
    try:
        for pool_name, path in (("shared", SHARED_IN_HOST), ("images", LOCAL_IN_HOST)):
            try:
                pool = conn.storagePoolLookupByName(pool_name)
            except libvirt.libvirtError:
                pool = conn.storagePoolDefineXML(_pool_xml(pool_name, path))
            if not pool.isActive():
                pool.create()
            if not pool.autostart():
                pool.setAutostart(1)
    finally:
        conn.close()


def _destroy_guests(name: str, timeout: float = 15.0) -> None:
    """Destroy a host's running guests through its libvirtd, giving up after `timeout`
    (a wedged daemon must not hang `down`: its QEMU is killed by PID file afterwards)."""
    libvirt = _libvirt()

    def destroy_all():
        try:
            conn = libvirt.open(uri(name))
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
        finally:
            conn.close()

    worker = threading.Thread(target=destroy_all, daemon=True, name=f"lab-destroy-{name}")
    worker.start()
    worker.join(timeout)


def _stop_host(name: str, graceful: bool = True) -> bool:
    """Stop one host; returns True when something of it was running."""
    hd = host_dir(name)
    pids = _host_pids(name)
    was_running = bool(pids["tini"] or pids["libvirtd"])
    if graceful and pids["libvirtd"] and _port_open(name):
        _destroy_guests(name)  # through the API: QEMU survives a libvirtd that just exits
    in_ns = lambda p: _in_host_ns(p, name)  # noqa: E731
    if hd.exists():
        stop_sshd(name)
    for pid in (pids["tini"], pids["libvirtd"]):  # tini forwards SIGTERM to libvirtd
        _kill_verified(pid, in_ns)
    left = _wait_gone([p for p in pids.values() if p], STOP_TIMEOUT)
    for pid in left:
        _kill_verified(pid, in_ns, signal.SIGKILL)
    # Leftover QEMU (a killed libvirtd does not take its guests with it): by libvirt's PID
    # files first, then a sweep of anything else still proven to be in this namespace.
    victims = []
    qemu_run = hd / "run" / "qemu"
    if qemu_run.is_dir():
        for pf in qemu_run.glob("*.pid"):
            pid = _pid_from(pf)
            if _kill_verified(pid, lambda p: _comm(p).startswith("qemu") and in_ns(p), signal.SIGKILL):
                victims.append(pid)
    if hd.exists():
        for pid in _ns_processes(name):
            if _kill_verified(pid, in_ns, signal.SIGKILL):
                victims.append(pid)
    _wait_gone(victims + left, 3.0)
    (hd / "tini.pid").unlink(missing_ok=True)
    return was_running or bool(victims)


def _host_running(name: str) -> bool:
    pids = _host_pids(name)
    return bool(pids["tini"] and pids["libvirtd"])


# --------------------------------------------------------------------------- public


def is_up(n: int = 2) -> bool:
    """True when the first n lab hosts run (verified PIDs) and accept connections."""
    return all(_host_running(h) and _port_open(h) for h in HOST_NAMES[: _host_count(n)])


def up(n: int = 2) -> list[str]:
    """Start the first n lab hosts; idempotent.  Returns the names of the hosts it started
    (empty when all were already running)."""
    names = HOST_NAMES[: _host_count(n)]
    check_prerequisites()
    with _locked():
        _upgrade_without_tls(names)
        if all(_host_running(h) and _port_open(h) for h in names) and _shared_healthy():
            _start_sshd_quietly(names)
            return []
        _check_namespaces()
        if not _shared_healthy():
            # bindfs died under running hosts: their bind copies of the mount are dead too,
            # so they must restart on the fresh mount.
            victims = running_hosts()
            for name in victims:
                _stop_host(name)
            names = [h for h in HOST_NAMES if h in names or h in victims]
            _ensure_shared()
        _write_hosts_file()
        _ensure_mount_points()
        procs = {}
        for name in names:
            if _host_running(name) and _port_open(name):
                continue
            _clear_stale(name)  # also a daemon that runs but stopped answering
            _check_port_free(name)
            _write_host_config(name)
            procs[name] = _spawn(name)
        try:
            _wait_ready(procs)
        except LabError:
            for name in procs:
                _stop_host(name, graceful=False)
            raise
        for name in names:
            try:
                _ensure_pools(name)
            except _libvirt().libvirtError as exc:
                raise LabError(f"{name}: storage pools: {exc.get_error_message()}") from None
        _start_sshd_quietly(names)
        return list(procs)


def _upgrade_without_tls(names) -> None:
    """Stop running hosts whose libvirtd has no TLS listener (started by lab code older
    than lab/pki.py) so that up() restarts them with it, but only when it harms nobody:
    no other live session holds a lease and no guest runs on them.  Otherwise they are
    left alone and require_tls() says why TLS is missing.  Call under the lock."""
    stale = [h for h in names if _host_running(h) and _port_open(h, 0.5) and not tls_ready(h, 0.5)]
    if not stale:
        return
    mine = str(os.getpid())
    if any(f.name != mine for f in _live_leases()) or _active_guests(stale):
        return
    for name in stale:
        _stop_host(name)


def running_hosts() -> list[str]:
    return [h for h in HOST_NAMES if _host_running(h)]


def down(purge: bool = False, hosts=None) -> list[str]:
    """Stop lab hosts (all by default): destroy guests through the API, stop daemons by
    verified PID, kill leftover QEMU, unmount shared storage once no host is left.
    purge=True also deletes LAB_DIR (disks, host UUIDs, definitions).  Returns the hosts
    that were stopped."""
    if not LAB_DIR.exists():
        return []
    if os.geteuid() != 0:
        raise LabError("the KVM lab needs root to stop its daemons")
    with _locked():
        stopped = _down_locked(hosts)
        if purge:
            if running_hosts():
                raise LabError("not purging: some lab hosts are still running")
            busy = [mp for mp, _ in _mounts() if mp == str(LAB_DIR) or mp.startswith(f"{LAB_DIR}/")]
            if busy:
                raise LabError(f"not purging: still mounted: {busy[0]}")
    if purge:
        shutil.rmtree(LAB_DIR, ignore_errors=True)
    return stopped


def _down_locked(hosts=None) -> list[str]:
    stopped = [h for h in (hosts or HOST_NAMES) if host_dir(h).exists() and _stop_host(h)]
    if not running_hosts():
        _unmount_shared()
        for mp in _read(LAB_DIR / "created-mountpoints").split():
            with contextlib.suppress(OSError):
                os.rmdir(mp)  # only if empty: never removes anything with content
        (LAB_DIR / "created-mountpoints").unlink(missing_ok=True)
        (LAB_DIR / "auto-started").unlink(missing_ok=True)
    return stopped


def status() -> dict:
    """What runs: per host PIDs, address, URI, hostname, UUID and guests; shared storage."""
    if os.geteuid() != 0:
        raise LabError("the KVM lab needs root (process checks read /proc/PID/root)")
    libvirt = _libvirt()

    hosts = []
    for name in HOST_NAMES:
        hd = host_dir(name)
        pids = _host_pids(name) if hd.exists() else {"tini": 0, "libvirtd": 0}
        info = {
            "name": name,
            "ip": ip(name),
            "uri": uri(name),
            "running": bool(pids["tini"] and pids["libvirtd"]),
            "tini_pid": pids["tini"],
            "libvirtd_pid": pids["libvirtd"],
            "host_uuid": _read(hd / "host_uuid") or None,
            "hostname": None,
            "guests": [],
        }
        if info["running"]:
            try:
                conn = libvirt.open(info["uri"])
                try:
                    info["hostname"] = conn.getHostname()
                    for dom in conn.listAllDomains():
                        state = "running" if dom.isActive() else "shut off"
                        info["guests"].append({"name": dom.name(), "uuid": dom.UUIDString(), "state": state})
                finally:
                    conn.close()
            except libvirt.libvirtError as e:
                info["error"] = e.get_error_message()
        if hd.exists() or info["running"]:
            hosts.append(info)
    return {
        "lab_dir": str(LAB_DIR),
        "shared": {
            "path": str(shared_dir()),
            "mounted": _is_mounted(shared_dir()),
            "healthy": _shared_healthy(),
            "bindfs_pid": _bindfs_pid(),
        },
        "virt": _read(LAB_DIR / "virt") or None,
        "hosts": hosts,
        "sessions": len(_live_leases(prune=False)),  # test sessions holding a lease right now
        "auto_started": _read(LAB_DIR / "auto-started").split(),  # torn down by the last session
    }


# --------------------------------------------------------------------------- test sessions


def _lease_dir() -> Path:
    return LAB_DIR / "leases"


def _live_leases(prune: bool = True) -> list[Path]:
    """Leases whose session still runs; prune (only under the lock) removes dead ones."""
    live = []
    if _lease_dir().is_dir():
        for f in _lease_dir().iterdir():
            pid = int(f.name) if f.name.isdigit() else 0
            if pid and _alive(pid) and _starttime(pid) == _read(f):
                live.append(f)
            elif prune:
                f.unlink(missing_ok=True)  # the session died without releasing
    return live


@contextlib.contextmanager
def session(n: int = 2):
    """Use the lab for the duration of a block (a pytest session, a benchmark).

    Reuses a running lab.  Hosts this block had to start are torn down at the end, but
    only once no other live session (another engineer's `make test`) still holds a lease;
    the last session out does it.  A lab started by `labctl up` is never torn down here.
    Yields the list of host names this block started."""
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    lease = _lease_dir() / str(os.getpid())
    with _locked():
        _lease_dir().mkdir(exist_ok=True)
        lease.write_text(_starttime(os.getpid()))
    started = []
    try:
        started = up(n)
        if started:
            with _locked():
                auto = set(_read(LAB_DIR / "auto-started").split()) | set(started)
                (LAB_DIR / "auto-started").write_text("\n".join(sorted(auto)) + "\n")
        yield started
    finally:
        with _locked():  # decide and tear down under one lock: no session can join between
            lease.unlink(missing_ok=True)
            auto = _read(LAB_DIR / "auto-started").split()
            # A running guest nobody leased means someone (a benchmark, a person calling
            # lab.up() directly) is still using the lab: leave it; a later session retries.
            if auto and not _live_leases() and not _active_guests(auto):
                _down_locked(auto)
                (LAB_DIR / "auto-started").unlink(missing_ok=True)


def _active_guests(hosts) -> list[str]:
    """Names of running guests on the given (running) hosts."""
    libvirt = _libvirt()
    names = []
    for name in hosts:
        if not _host_running(name):
            continue
        try:
            conn = libvirt.open(uri(name))
        except libvirt.libvirtError:
            continue
        try:
            names += [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        finally:
            conn.close()
    return names


def keep_running() -> None:
    """Mark the running lab as wanted by a person (`labctl up`): sessions leave it up."""
    with _locked():
        (LAB_DIR / "auto-started").unlink(missing_ok=True)

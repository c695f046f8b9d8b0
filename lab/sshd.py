"""An OpenSSH server per lab host, for qemu+ssh / qemu+libssh2 connections and peer-to-peer
migration over SSH.

No system sshd is installed or started: scripts/setup.sh unpacks the Debian packages
(openssh-server, openssh-sftp-server, libwrap0) with `dpkg -x` into ``OPENSSH_ROOT``
(/var/cache/kvmweb-lab/openssh/root, outside the lab dir so `down --purge` keeps it);
a machine that has /usr/sbin/sshd uses that one.

Each host's sshd runs inside that host's mount+UTS namespace (entered with `nsenter` on
its libvirtd), so an SSH session reaches *that* host's /run/libvirt/libvirt-sock, and
listens on the host's loopback address, port 22.  It runs in one more private mount
namespace of its own, where a copy of /etc/passwd with the privilege-separation user
``sshd`` is bind-mounted (the unpacked package has no postinst to create it; libvirtd's
view is untouched).

Layout under ``$LAB_DIR``:

    ssh/client/id_ed25519(.pub)  a client key authorised on every host (labctl's URIs, and
                                 the source libvirtd of a peer-to-peer migration)
    ssh/known_hosts              every host's key, as `ssh-keyscan` prints it (labctl's URIs)
    ssh/passwd                   /etc/passwd + the sshd user (bind-mounted for sshd only)
    <host>/ssh/ssh_host_ed25519_key(.pub)   the host's own key
    <host>/ssh/authorized_keys   lab client key + keys added by authorize()
    <host>/ssh/sshd_config, sshd.pid, sshd.log
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

OPENSSH_ROOT = Path(os.environ.get("KVMWEB_LAB_OPENSSH_DIR", "/var/cache/kvmweb-lab/openssh")) / "root"
SSH_PORT = 22
PRIVSEP_DIR = "/run/sshd"  # compiled into sshd; must exist, root-owned, not writable by others


def binary() -> Path | None:
    """The sshd to run: the unpacked package (setup.sh), else a system-installed one."""
    for candidate in (OPENSSH_ROOT / "usr/sbin/sshd", Path("/usr/sbin/sshd")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_reason() -> str | None:
    if binary() is None:
        return (
            f"no sshd for the lab: run `make setup` as root (it unpacks openssh-server into {OPENSSH_ROOT} "
            "without starting a system sshd)"
        )
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is missing (apt-get install openssh-client)"
    return None


def ssh_dir(lab_dir: Path) -> Path:
    return lab_dir / "ssh"


def client_key(lab_dir: Path) -> Path:
    return ssh_dir(lab_dir) / "client" / "id_ed25519"


def known_hosts(lab_dir: Path) -> Path:
    return ssh_dir(lab_dir) / "known_hosts"


def host_ssh_dir(host_dir: Path) -> Path:
    return host_dir / "ssh"


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _passwd(lab_dir: Path) -> Path:
    path = ssh_dir(lab_dir) / "passwd"
    text = Path("/etc/passwd").read_text()
    if not any(line.startswith("sshd:") for line in text.splitlines()):
        text = text.rstrip("\n") + f"\nsshd:x:64900:65534::{PRIVSEP_DIR}:/usr/sbin/nologin\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def authorize(host_dir: Path, public_line: str) -> None:
    """Append a public key to the host's authorized_keys (idempotent; several sessions may
    share the lab, so lines are only ever added here)."""
    path = host_ssh_dir(host_dir) / "authorized_keys"
    line = public_line.strip()
    current = path.read_text().splitlines() if path.exists() else []
    if line not in current:
        with open(path, "a") as f:
            f.write(line + "\n")


def host_public_key(host_dir: Path) -> str:
    """'ssh-ed25519 AAAA...' of the host's own key."""
    pub = (host_ssh_dir(host_dir) / "ssh_host_ed25519_key.pub").read_text().split()
    return f"{pub[0]} {pub[1]}"


def write_config(lab_dir: Path, name: str, host_dir: Path, address: str) -> None:
    """Keys, authorized_keys and sshd_config of one host; the lab-wide client key and
    known_hosts line.  Idempotent; keys are created once and kept across `down`."""
    hs = host_ssh_dir(host_dir)
    hs.mkdir(mode=0o700, parents=True, exist_ok=True)
    _keygen(client_key(lab_dir), "kvmweb-lab-client")
    _keygen(hs / "ssh_host_ed25519_key", f"{name}-host")
    authorize(host_dir, client_key(lab_dir).with_suffix(".pub").read_text())
    kh = known_hosts(lab_dir)
    entry = f"{address} {host_public_key(host_dir)}"
    lines = [ln for ln in (kh.read_text().splitlines() if kh.exists() else []) if ln.split(" ")[0] != address]
    if entry not in lines:
        kh.write_text("\n".join([*lines, entry]) + "\n")
    sftp = OPENSSH_ROOT / "usr/lib/openssh/sftp-server"
    if not sftp.exists():
        sftp = Path("/usr/lib/openssh/sftp-server")
    (hs / "sshd_config").write_text(
        "# Written by kvmweb lab (lab/sshd.py): keys only, root allowed (like libvirt hosts).\n"
        f"ListenAddress {address}:{SSH_PORT}\n"
        f"HostKey {hs / 'ssh_host_ed25519_key'}\n"
        f"AuthorizedKeysFile {hs / 'authorized_keys'}\n"
        "PidFile none\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # The lab dir sits under /var/tmp (mode 1777), which StrictModes rejects.
        "StrictModes no\n"
        "PrintMotd no\n"
        "LogLevel VERBOSE\n"
        f"Subsystem sftp {sftp}\n"
    )


def spawn(lab_dir: Path, host_dir: Path, ns_pid: int) -> subprocess.Popen:
    """Start sshd inside the namespace of ``ns_pid`` (the host's libvirtd).  nsenter,
    unshare and bash all exec, so the returned PID is sshd's own."""
    sshd = binary()
    hs = host_ssh_dir(host_dir)
    script = f"mount --bind '{_passwd(lab_dir)}' /etc/passwd && exec {sshd} -D -e -f '{hs / 'sshd_config'}'"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    libdir = OPENSSH_ROOT / "usr/lib/x86_64-linux-gnu"
    if str(sshd).startswith(str(OPENSSH_ROOT)) and libdir.is_dir():
        env["LD_LIBRARY_PATH"] = str(libdir)  # libwrap0, unpacked next to sshd
    log = open(hs / "sshd.log", "ab")
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--target={ns_pid}",
            "--mount",
            "--uts",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
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
        start_new_session=True,
    )
    log.close()
    (hs / "sshd.pid").write_text(f"{proc.pid}\n")
    return proc


def failure(host_dir: Path) -> str:
    try:
        lines = (host_ssh_dir(host_dir) / "sshd.log").read_text().strip().splitlines()
    except OSError:
        lines = []
    return (lines or ["no output"])[-1][-300:]


def wait_listening(procs: dict, port_open, timeout: float) -> list[str]:
    """Wait until every {name: Popen} listens; returns the names whose sshd exited."""
    deadline = time.monotonic() + timeout
    pending, dead = dict(procs), []
    while pending and time.monotonic() < deadline:
        for name, proc in list(pending.items()):
            if proc.poll() is not None:
                dead.append(name)
                del pending[name]
            elif port_open(name, 0.05, SSH_PORT):
                del pending[name]
        if pending:
            time.sleep(0.02)
    return dead + list(pending)

"""Is a TCP port range of one host reachable from another?  Measured, never assumed.

A live migration's memory stream (and a storage copy's NBD connection) goes from the
source host's QEMU straight to a port the target's libvirtd picks in its migration range
(``migration_port_min``..``migration_port_max`` in the target's qemu.conf; QEMU's default
49152-49215), unless the migration is tunnelled.  kvmweb usually runs on a third machine,
so what it can honestly measure is:

* **from the source** (``SOURCE``) when the source is reached over SSH: kvmweb logs in
  with the identity and known_hosts of the source's URI (the ssh binary in batch mode, no
  prompt, no agent) and runs a small bash script there that opens a TCP connection to each
  probed port with bash's ``/dev/tcp``, bounded by ``timeout``;
* **from kvmweb's machine** (``KVMWEB``) otherwise (qemu+tcp/qemu+tls sources, or when the
  SSH probe could not run): the same connections from here.  That is a different path
  from the source's, and the result says so.

Each probed port ends as ``OPEN`` (something listens), ``CLOSED`` (the host answered with
a reset: nothing listens, but packets get through, which is what matters before
libvirt opens the port), ``REJECTED`` (an ICMP error or a local firewall refused it) or
``FILTERED`` (no answer within ``timeout``: a firewall drops it).

Which ports: libvirt hands out the range from its lowest port upward, and a connection to
a port where a target QEMU is just waiting for an incoming migration would be taken as
that migration's stream (and end it).  So the probe leaves the low end alone and takes
the middle and the top of the range: a range nobody opened fails both, a range opened too
narrowly fails the top.  A clean result is cached briefly (KVMWEB_PORT_PROBE_CACHE_SECONDS)
per (source, address, ports, target URI) so that checklists run again and again (wizard,
job start, batches) do not probe each time; a failure is measured again at the next run.

Over the same SSH session the probe also runs ``virsh -c TARGET-URI hostname`` on the
source: what the source's libvirtd does first in a peer-to-peer migration, with the key,
known_hosts or certificate files the target's URI names, as they are on the source.
"""

from __future__ import annotations

import errno
import selectors
import shlex
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.core.cache import cache
from django.utils.translation import gettext as _

from hosts import transport

QEMU_PORT_MIN, QEMU_PORT_MAX = 49152, 49215  # QEMU's / libvirt's default migration range
OPEN, CLOSED, REJECTED, FILTERED = "open", "closed", "rejected", "filtered"
REACHABLE = (OPEN, CLOSED)
SOURCE, KVMWEB = "source", "kvmweb"

# Runs on the source with `bash -s -- ADDRESS TIMEOUT P2P-URI PORT...`; one line per port:
# "kvmweb-probe PORT EXIT-STATUS FIRST-LINE-OF-STDERR".  timeout(1) exits 124 when the
# connection attempt got no answer; C locale so the error text can be read.  With a
# P2P-URI other than "-" it also runs `virsh -c P2P-URI hostname` there, as the source's
# libvirtd will open that URI for a peer-to-peer migration (the same key, known_hosts or
# certificate files, read on the source): "kvmweb-p2p EXIT-STATUS OUTPUT-ON-ONE-LINE".
PROBE_SCRIPT = r"""export LC_ALL=C
h=$1; t=$2; u=$3; shift 3
if [ "$u" != "-" ]; then
  ( if command -v virsh >/dev/null 2>&1; then out=$(timeout 6 virsh -q -c "$u" hostname 2>&1); rc=$?
    else out="virsh: command not found"; rc=127; fi
    echo "kvmweb-p2p $rc ${out//$'\n'/ }" ) &
fi
for p in "$@"; do
  ( out=$(timeout "$t" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$h" "$p" 2>&1); rc=$?
    echo "kvmweb-probe $p $rc ${out%%$'\n'*}" ) &
done
wait
"""


class ProbeError(Exception):
    """The probe could not run on the source (login refused, no bash, timeout): the
    message says why; the caller measures from kvmweb instead and says so."""


@dataclass
class PortState:
    port: int
    state: str  # OPEN, CLOSED, REJECTED, FILTERED
    said: str = ""


@dataclass
class Reach:
    """What was measured: from where (``vantage``), to which address, each port's state;
    ``fallback`` says why the source itself could not be the vantage point."""

    vantage: str
    address: str
    ports: list[PortState] = field(default_factory=list)
    fallback: str = ""
    elapsed_ms: int = 0
    cached: bool = False
    # On the source only: did `virsh -c TARGET-URI hostname` work there?
    # {"uri", "ok", "said", "user"} (ok None: virsh missing there); None when not tried.
    p2p: dict | None = None

    @property
    def filtered(self):
        return [p for p in self.ports if p.state not in REACHABLE]

    def as_details(self):
        out = asdict(self)
        out["ports"] = [asdict(p) for p in self.ports]
        return out


def port_range(host):
    """(min, max) of ``host``'s migration ports: the range an administrator entered for
    it (its qemu.conf's migration_port_min/max), else QEMU's default."""
    lo = getattr(host, "migration_port_min", None) or QEMU_PORT_MIN
    hi = getattr(host, "migration_port_max", None) or QEMU_PORT_MAX
    return (lo, hi) if lo <= hi else (hi, lo)


def sample_ports(lo, hi):
    """The ports probed in ``lo..hi``: the middle and the top (see the module docstring),
    never the lowest unless the range is that one port (a two-port range's "middle" would
    be its lowest: the port libvirt hands out first)."""
    if hi <= lo:
        return [hi]
    return sorted({lo + max(1, (hi - lo) // 2), hi})


def probe_timeout():
    return float(getattr(settings, "PORT_PROBE_TIMEOUT", 1.0))


def cache_seconds():
    return int(getattr(settings, "PORT_PROBE_CACHE_SECONDS", 300))


def _classify(code, said=""):
    """State of one port from a connect() errno (0 = connected) or bash's words."""
    lowered = said.lower()
    if code == 0:
        return OPEN
    if code == errno.ECONNREFUSED or "connection refused" in lowered:
        return CLOSED
    if code in (errno.ETIMEDOUT, 124) or "timed out" in lowered:
        return FILTERED
    return REJECTED


def probe_from_here(address, ports, timeout):
    """Connect from kvmweb's machine to ``address`` on every port at once (non-blocking,
    one select loop), each bounded by ``timeout``; a connection made is closed at once."""
    infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    family, _t, _p, _c, sockaddr = infos[0]
    sel = selectors.DefaultSelector()
    states = {}
    try:
        for port in ports:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((sockaddr[0], port, *sockaddr[2:]))
            if code in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                sel.register(sock, selectors.EVENT_WRITE, port)
            else:
                states[port] = PortState(port, _classify(code), errno.errorcode.get(code, str(code)))
                sock.close()
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ev in sel.select(max(0.0, deadline - time.monotonic())):
                sock, port = key.fileobj, key.data
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                states[port] = PortState(port, _classify(code), errno.errorcode.get(code, "") if code else "")
                sel.unregister(sock)
                sock.close()
        for key in list(sel.get_map().values()):
            states[key.data] = PortState(key.data, FILTERED, _("no answer within %(s)g s") % {"s": timeout})
            sel.unregister(key.fileobj)
            key.fileobj.close()
    finally:
        sel.close()
    return [states[p] for p in ports]


def ssh_command(target, remote, connect_timeout):
    """The ssh command line that runs ``remote`` (a list of words) on an SSHTarget with
    the URI's key and known_hosts only: batch mode, confirmed host keys, no agent."""
    cmd = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    cmd += ["-o", f"UserKnownHostsFile={target.known_hosts or transport.known_hosts_path()}"]
    cmd += ["-o", "GlobalKnownHostsFile=/dev/null", "-o", f"ConnectTimeout={max(1, round(connect_timeout))}"]
    cmd += ["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-T", "-p", str(target.port)]
    if target.keyfile:
        cmd += ["-i", target.keyfile]
    if target.user:
        cmd += ["-l", target.user]
    return [*cmd, "--", target.address, " ".join(shlex.quote(w) for w in remote)]


P2P_TIMEOUT = 6  # seconds for `virsh -c TARGET hostname` on the source (in PROBE_SCRIPT)


def probe_from_source(source_uri, address, ports, timeout, connect_timeout=3.0, p2p_uri=None):
    """Run PROBE_SCRIPT on the source host of ``source_uri`` (an SSH URI) over SSH.
    Returns ([PortState], p2p) where p2p is {"uri", "ok", "said", "user"} when
    ``p2p_uri`` was tried, else None.  Raises ProbeError when it cannot run or gives no
    answer for every port."""
    target = transport.ssh_target(source_uri)
    if target is None:
        raise ProbeError(_("the source is not reached over SSH"))
    remote = ["bash", "-s", "--", address, f"{timeout:g}", p2p_uri or "-", *[str(int(p)) for p in ports]]
    try:
        run = subprocess.run(
            ssh_command(target, remote, connect_timeout),
            input=PROBE_SCRIPT,
            capture_output=True,
            text=True,
            timeout=connect_timeout + max(timeout, P2P_TIMEOUT if p2p_uri else 0) + 5,
        )
    except FileNotFoundError:
        raise ProbeError(
            _("ssh is not installed on kvmweb's machine (Debian package openssh-client)")
        ) from None
    except subprocess.TimeoutExpired:
        raise ProbeError(_("no answer from the source over SSH")) from None
    found, p2p = {}, None
    for line in run.stdout.splitlines():
        if line.startswith("kvmweb-p2p ") and p2p_uri:
            words = line.split(" ", 2)
            said = words[2].strip() if len(words) > 2 else ""
            ok = words[1] == "0"
            if words[1] == "124":
                said = _("no answer within %(s)g s") % {"s": P2P_TIMEOUT}
            elif words[1] == "127":  # no virsh on the source: nothing was tried, nothing failed
                ok, said = None, _("virsh is not installed on the source, so it could not try")
            p2p = {"uri": p2p_uri, "ok": ok, "said": said, "user": target.user or ""}
            continue
        words = line.split(" ", 3)
        if len(words) >= 3 and words[0] == "kvmweb-probe" and words[1].isdigit() and words[2].isdigit():
            said = words[3].strip() if len(words) > 3 else ""
            code = int(words[2])
            if "No such file" in said:  # bash built without /dev/tcp
                raise ProbeError(_("bash on the source cannot open /dev/tcp connections"))
            if code == 124:
                said = _("no answer within %(s)g s") % {"s": timeout}
            found[int(words[1])] = PortState(int(words[1]), _classify(code, said), said)
    if set(found) != set(ports) or (p2p_uri and p2p is None):
        lines = [ln for ln in run.stderr.strip().splitlines() if ln and not ln.startswith("Warning")]
        raise ProbeError(
            (lines or [_("the probe printed nothing (exit status %(rc)s)") % {"rc": run.returncode}])[-1]
        )
    return [found[p] for p in ports], p2p


def measure(source, target_address, ports, *, p2p_uri=None, timeout=None, use_cache=True):
    """A Reach of ``target_address`` on ``ports``: from the source host when its URI is an
    SSH one (then also whether the source opens ``p2p_uri``, when given), else (or when
    that fails) from kvmweb's machine.  Cached for PORT_PROBE_CACHE_SECONDS per (source
    URI, address, ports, p2p URI)."""
    timeout = probe_timeout() if timeout is None else timeout
    import hashlib

    wanted = "|".join([source.uri, target_address, ",".join(map(str, ports)), p2p_uri or ""])
    key = "hosts.reach:" + hashlib.sha256(wanted.encode()).hexdigest()
    if use_cache:
        hit = cache.get(key)
        if hit is not None:
            reach = Reach(**{**hit, "ports": [PortState(**p) for p in hit["ports"]]})
            reach.cached = True
            return reach
    t0 = time.monotonic()
    reach = None
    fallback = ""
    if transport.ssh_target(source.uri) is not None:
        try:
            states, p2p = probe_from_source(source.uri, target_address, ports, timeout, p2p_uri=p2p_uri)
            reach = Reach(SOURCE, target_address, states, p2p=p2p)
        except ProbeError as exc:
            fallback = _("the probe could not run on %(source)s over SSH: %(error)s") % {
                "source": source.name,
                "error": exc,
            }
    else:
        fallback = _("%(source)s is not reached over SSH, so kvmweb cannot run a probe on it") % {
            "source": source.name
        }
    if reach is None:
        reach = Reach(KVMWEB, target_address, probe_from_here(target_address, ports, timeout), fallback)
    reach.elapsed_ms = round((time.monotonic() - t0) * 1000)
    # Only a clean result is reused: after a fix to a firewall or a key the next checklist
    # measures again instead of repeating the old failure for minutes.
    clean = not reach.filtered and (reach.p2p is None or reach.p2p["ok"])
    if use_cache and clean:
        cache.set(key, reach.as_details(), cache_seconds())
    return reach

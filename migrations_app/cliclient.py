"""`manage.py migrate_vm` / `manage.py preflight` without Django's start-up: the client side.

`virsh` is a small client of a daemon that is already running; `manage.py migrate_vm`
paid Python's and Django's whole start-up (1-2 s on a loaded host, a third of a 3 s
migration) before it did anything. When `manage.py cli_server` runs (scripts/run.sh
starts it; migrations_app/cliserver.py), manage.py hands these commands to it: the server
forks a process that has everything imported already, gives it this process's standard
input, output and error (passed over the Unix socket), arguments, environment and
working directory, and that process runs the command exactly as `manage.py` would. This
process relays signals (Ctrl-C) to it and exits with its exit status.

Nothing here imports Django (it runs before Django is set up). When no server answers,
the server refuses (another data directory or settings), or KVMWEB_CLI_SERVER=0, manage.py
runs the command itself as before.
"""

import hashlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

SERVED = ("migrate_vm", "preflight")
SOCKET_NAME = "cli.sock"
ROOT = Path(__file__).resolve().parent.parent


def socket_path(environ=None):
    """The server's socket: in the data directory, as settings.DATA_DIR computes it."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("KVMWEB_DATA_DIR") or ROOT / "var") / SOCKET_NAME


def secret_files(environ):
    """The variables that name a secret file (KVMWEB_*_FILE, libpq's PGPASSFILE)."""
    return sorted(
        k for k in environ if (k.startswith("KVMWEB_") and k.endswith("_FILE")) or k == "PGPASSFILE"
    )


def file_digests(environ):
    """{variable: SHA-256 of the file it names, or None when unreadable} for
    ``secret_files``: the server compares contents, not paths (under systemd its own
    secrets are in its private credentials directory, docs/deploy/kvmweb-cli.service)."""
    digests = {}
    for key in secret_files(environ):
        try:
            with open(environ[key], "rb") as f:
                digests[key] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            digests[key] = None
    return digests


def _lines(sock):
    """The server's replies, one line at a time (``P pid``, ``R why``, ``X status``)."""
    buffered = b""
    while True:
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            yield line.decode("utf-8", "replace")
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buffered += chunk


def run(argv):
    """Run ``argv`` (manage.py's sys.argv) through the server; its exit status, or None
    when manage.py must run the command itself."""
    if len(argv) < 2 or argv[1] not in SERVED or os.environ.get("KVMWEB_CLI_SERVER") == "0":
        return None
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None  # no server (or not ours to use: the socket is 0600 in a 0700 dir)
    request = {
        "argv": list(argv[1:]),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "files": file_digests(os.environ),
    }
    request = json.dumps(request).encode()
    try:
        socket.send_fds(sock, [struct.pack("!I", len(request)) + request], [0, 1, 2])
    except OSError:
        sock.close()
        return None
    replies = _lines(sock)
    first = next(replies, "")
    if not first.startswith("P "):
        sock.close()
        return None  # refused ("R why"): run it here
    pid = int(first[2:])

    def relay(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, relay)
    status = None
    for line in replies:
        if line.startswith("X "):
            status = int(line[2:])
            break
    sock.close()
    if status is None:
        sys.stderr.write(f"manage.py {argv[1]}: the command's process ({pid}) ended without an exit status\n")
        return 1
    return status

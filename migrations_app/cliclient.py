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

# Only modules the interpreter has loaded at start-up, and _socket: this process is all a
# served command pays before the server's child runs it, and on a loaded host json,
# pathlib, socket, struct and hashlib took 0.15 s to import (python -X importtime) while
# the interpreter's own start took 0.1-0.2 s. The request is JSON written by _json below.
import _signal
import _socket
import os
import sys

SERVED = ("migrate_vm", "preflight")
SOCKET_NAME = "cli.sock"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def __getattr__(name):
    if name == "ROOT":  # the checkout, as a Path (for the server and tests)
        from pathlib import Path

        return Path(_ROOT)
    raise AttributeError(name)


def _socket_file(environ):
    return os.path.join(environ.get("KVMWEB_DATA_DIR") or os.path.join(_ROOT, "var"), SOCKET_NAME)


def socket_path(environ=None):
    """The server's socket: in the data directory, as settings.DATA_DIR computes it."""
    from pathlib import Path

    return Path(_socket_file(os.environ if environ is None else environ))


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
    names = secret_files(environ)
    if names:
        import hashlib  # only then (its OpenSSL module alone took 30 ms to load)

        for key in names:
            try:
                with open(environ[key], "rb") as f:
                    digests[key] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                digests[key] = None
    return digests


def _json(value):
    """``value`` (str, None, list or dict of them) as JSON (ASCII, as json.dumps writes it;
    an environment may hold undecodable bytes as lone surrogates: escaped the same way)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            return f'"{value}"'
        out = []
        for ch in value:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif 0x20 <= code < 0x7F:
                out.append(ch)
            elif code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04x}")
        return '"' + "".join(out) + '"'
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(k)}:{_json(v)}" for k, v in value.items()) + "}"
    return "[" + ",".join(_json(v) for v in value) + "]"


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
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(_socket_file(os.environ))
    except OSError:
        sock.close()
        return None  # no server (or not ours to use: the socket is 0600 in a 0700 dir)
    here = os.stat(".")
    request = {
        "argv": list(argv[1:]),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        # Which directory that is: the server may see another one at the same path.
        "cwd_id": f"{here.st_dev}:{here.st_ino}",
        "files": file_digests(os.environ),
    }
    request = _json(request).encode("ascii")
    # Standard input, output and error as SCM_RIGHTS (what socket.send_fds sends).
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
    try:
        sock.sendmsg(
            [len(request).to_bytes(4, "big") + request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)]
        )
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

    for signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(signum, relay)
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

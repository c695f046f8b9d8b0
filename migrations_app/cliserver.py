"""`manage.py cli_server`: runs `migrate_vm` and `preflight` for manage.py without
Django's start-up (the client side and why: migrations_app/cliclient.py).

One process with Django set up and the commands' modules imported listens on
<data dir>/cli.sock (0600 in the 0700 data directory). Per request it forks a child; the
child takes the caller's standard input, output and error, environment, working directory
and arguments, tells the caller its PID (the caller relays Ctrl-C to it), runs the
command through Django's own ``execute_from_command_line`` and sends its exit status last.
So a served command is a process of its own, like one manage.py started: its own
database connection, its own libvirt connections, `migrate_vm --wait` runs its job in it
with the worker's claim, journal and heartbeats, and a killed child is a killed command
(reconcile concludes its job). A restart of the server does not touch running children
(each is in a session of its own).

Refused, so manage.py runs the command itself: another user than the server's (or root),
a command not in ``SERVED``, or settings the server was not started with (the caller's
KVMWEB_*, DJANGO_*, DATABASE_URL, REDIS_URL... differ: another data directory or
database; a secret file variable such as KVMWEB_SECRET_KEY_FILE or PGPASSFILE matches
when it names a file with the same content, as the server's systemd credentials live
under another path: docs/deploy/kvmweb-cli.service), a working directory the server cannot
see or sees as another directory (systemd's PrivateTmp, another mount namespace: the
caller sends which directory it is, ``cwd_id``), or ``--settings``/``--pythonpath`` on
the command line. The server must be restarted with the other services when the code
changes, as the workers are.

The server stays single-threaded (a fork from a process with threads could inherit a
held lock) and opens no database or libvirt connection of its own.
"""

import gc
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import traceback

from migrations_app.cliclient import SERVED, file_digests, secret_files, socket_path

log = logging.getLogger(__name__)

# Set for one run, never part of the settings: may differ between the caller and the server.
PER_RUN = {"KVMWEB_CLI_TIMING", "KVMWEB_ADMIN_USER", "KVMWEB_CRASH_AFTER_STEP", "KVMWEB_CLI_SERVER"}
SETTINGS_PREFIXES = ("KVMWEB_", "DJANGO_", "DATABASE_", "REDIS_", "Q_CLUSTER", "PROMETHEUS_")
MAX_REQUEST = 1 << 20


def settings_env(environ):
    """The part of an environment the settings (and django-q2's) are read from."""
    return {k: v for k, v in environ.items() if k.startswith(SETTINGS_PREFIXES) and k not in PER_RUN}


def refusal(request, server_env, server_files=None):
    """Why this server must not run ``request`` ("" when it may). Secret files (``*_FILE``,
    PGPASSFILE) match when they name the same path or files with the same content
    (``server_files``: the server's ``file_digests``; the request carries the caller's)."""
    argv = request.get("argv") or []
    if not argv or argv[0] not in SERVED:
        return "not a served command"
    # Django applies these in the command's own process, before its set-up; a served
    # command is already set up with the server's settings, so it would silently run
    # against the server's database instead of the one asked for.
    if any(str(a).split("=", 1)[0] in ("--settings", "--pythonpath") for a in argv[1:]):
        return "--settings/--pythonpath given"
    cwd = request.get("cwd")
    if cwd:
        try:
            seen = os.stat(cwd)
        except OSError:
            seen = None
        if seen is None or not stat.S_ISDIR(seen.st_mode):
            # e.g. the caller's /tmp, hidden from a server with systemd's PrivateTmp
            return "working directory not visible to the server"
        same = request.get("cwd_id")
        if same is not None and same != f"{seen.st_dev}:{seen.st_ino}":
            # The path names another directory here: PrivateTmp's own /tmp/x, another
            # mount namespace. Relative paths would mean other files than the caller's.
            return "working directory not the caller's (the server sees another one at that path)"
    env = request.get("env") or {}
    theirs, ours = settings_env(env), settings_env(server_env)
    files = set(secret_files(env)) | set(secret_files(server_env))
    their_files, our_files = request.get("files") or {}, server_files or {}
    differ_files = []
    for key in files:
        theirs.pop(key, None)
        ours.pop(key, None)
        if env.get(key) == server_env.get(key):
            continue
        digest = their_files.get(key)
        if digest is None or digest != our_files.get(key) or key not in env or key not in server_env:
            differ_files.append(key)
    # Values the settings module sets in the server's own environment at start-up.
    for key in ("PROMETHEUS_MULTIPROC_DIR",):
        if key not in theirs:
            ours.pop(key, None)
    if theirs != ours or differ_files:
        differ = sorted(
            {k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)} | set(differ_files)
        )
        return "other settings: " + ", ".join(differ)
    return ""


def preload():
    """Import what a served command imports (the point of the server)."""
    from django.core.management import get_commands, load_command_class

    get_commands()  # cached: the child's execute_from_command_line does not scan the apps again
    for name in SERVED:
        load_command_class("migrations_app", name)
    import libvirt  # noqa: F401 - hosts/hypervisor.py imports it lazily in places

    from migrations_app import modes, runner  # noqa: F401
    from migrations_app.preflight import registry  # noqa: F401


def _recv_request(conn):
    """(request, [fds]). The descriptors came with the first message: on a bad request
    they are closed here (the caller only closes the ones it was handed)."""
    msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    try:
        if len(msg) < 4:
            raise ValueError("short request")
        (size,) = struct.unpack("!I", msg[:4])
        if size > MAX_REQUEST:
            raise ValueError("request too large")
        data = msg[4:]
        while len(data) < size:
            chunk = conn.recv(min(65536, size - len(data)))
            if not chunk:
                raise ValueError("truncated request")
            data += chunk
        return json.loads(data), fds
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def _peer_allowed(conn):
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.geteuid(), 0)


def _child(conn, fds, request):
    """In the forked child: become the caller's command, run it, report the status. Never
    returns."""
    status = 1
    try:
        os.setsid()
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        env = dict(request["env"])
        # Set by settings in this process; and the secret files the caller names with the
        # same content as ours (refusal): ours, which this process can read (libpq reads
        # PGPASSFILE at each connect; a root caller's path may be root-only).
        for key in ("PROMETHEUS_MULTIPROC_DIR", *secret_files(os.environ)):
            if key in os.environ:
                env[key] = os.environ[key]
        os.environ.clear()
        os.environ.update(env)
        os.chdir(request["cwd"])
        conn.sendall(f"P {os.getpid()}\n".encode())
        sys.argv = ["manage.py", *request["argv"]]
        from django.core.management import execute_from_command_line

        try:
            execute_from_command_line(sys.argv)
            status = 0
        except SystemExit as exc:
            code = exc.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                sys.stderr.write(f"{code}\n")
        except KeyboardInterrupt:
            status = 130
        except BaseException:
            traceback.print_exc()
            status = 1
        # What a normal exit does, then the status last (the caller exits on it).
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        conn.sendall(f"X {status}\n".encode())
    except BaseException:
        try:
            traceback.print_exc()
        except Exception:
            pass
    finally:
        os._exit(status)


def serve(stop=None):
    """Listen until SIGTERM/SIGINT (or ``stop()`` returns True after an accept times out)."""
    from django.db import connections

    preload()
    connections.close_all()
    # Everything loaded so far to the permanent generation: a child's garbage collections
    # do not walk (and so copy-on-write) the server's whole heap.
    gc.collect()
    gc.freeze()
    path = socket_path()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        if path.exists() or path.is_symlink():
            path.unlink()  # left by a server that died
    else:
        probe.close()
        raise RuntimeError(f"another cli_server listens on {path}")
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.settimeout(1.0)
    stopping = []

    def on_stop(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server_env = dict(os.environ)
    server_files = file_digests(server_env)
    log.info("cli_server listening on %s", path)
    print(f"cli_server: listening on {path}", flush=True)
    try:
        while not stopping and not (stop and stop()):
            try:
                conn, _addr = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
            fds = []
            try:
                conn.settimeout(5.0)
                if not _peer_allowed(conn):
                    conn.sendall(b"R not allowed\n")
                    continue
                request, fds = _recv_request(conn)
                why = refusal(request, server_env, server_files) or (
                    "" if len(fds) == 3 else "no standard streams"
                )
                if why:
                    print(f"cli_server: refused {request.get('argv', ['?'])[:1]}: {why}", flush=True)
                    conn.sendall(f"R {why}\n".encode())
                    continue
                conn.settimeout(None)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    _child(conn, fds, request)
                print(f"cli_server: {request['argv'][0]} in process {pid}", flush=True)
            except Exception as exc:  # one bad request never stops the server
                print(f"cli_server: bad request: {exc}", flush=True)
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                conn.close()
    finally:
        listener.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass

"""A kvmweb site of its own for the tests that drive real processes (the browser tests,
the API over daphne): a data dir with a file SQLite DB, daphne on a loopback port and, when
asked, the two qclusters. Every process is started here and stopped by its PID.

Migrating a fresh DB costs a few seconds a site: the first site of a session migrates a
template data dir once (DB, secret and audit keys, which belong together) and every site
starts from a copy of it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TEMPLATE_FILES = ("kvmweb.sqlite3", "secret_key", "audit_key")

_template = {}
_template_lock = threading.Lock()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_env(data_dir, **extra):
    """os.environ without the scale-out settings, for a site whose data dir is data_dir."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "KVMWEB_SQLITE_PATH")
    }
    env.update(
        KVMWEB_DATA_DIR=str(data_dir),
        KVMWEB_TEST_DRIVER_DIR=str(data_dir),  # the test-driver node files tests write here
        KVMWEB_ALLOWED_HOSTS="127.0.0.1",
        DJANGO_SETTINGS_MODULE="kvmweb.settings",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _run_manage(env, args, timeout):
    done = subprocess.run(
        [PY, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def migrated_template():
    """A data dir migrated once per test session (removed at exit)."""
    with _template_lock:
        if "dir" not in _template:
            path = Path(tempfile.mkdtemp(prefix="kvmweb-site-template."))
            _run_manage(site_env(path), ["migrate", "--no-input", "-v", "0"], 300)
            _template["dir"] = path
            import atexit

            atexit.register(shutil.rmtree, path, ignore_errors=True)
        return _template["dir"]


class Site:
    """kvmweb in its own data dir: daphne (and workers when asked), all by PID."""

    def __init__(self, data_dir):
        self.dir = Path(data_dir)
        self.env = site_env(self.dir)
        self.procs = []
        self.web = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        template = migrated_template()
        for name in TEMPLATE_FILES:
            shutil.copy2(template / name, self.dir / name)

    def manage(self, *args, timeout=180):
        return _run_manage(self.env, args, timeout)

    def python(self, code, timeout=180):
        """Run Django code in a separate process on this site's DB; returns its JSON print."""
        out = self.manage("shell", "-v", "0", "-c", code, timeout=timeout)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else None

    def start(self, name, *args, env=None):
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            list(args), cwd=ROOT, env=dict(self.env, **(env or {})), stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append((proc, log))
        return proc

    def start_web(self, timeout=120, env=None):
        """Start daphne the way scripts/run.sh does (`python -m kvmweb.serve`: its limits
        and graceful stop) and wait until it accepts connections."""
        proc = self.start(
            "daphne",
            PY,
            "-m",
            "kvmweb.serve",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
            "kvmweb.asgi:application",
            env=env,
        )
        self.web = proc
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, self.logs()
                time.sleep(0.05)

    def stop_web(self):
        self.web.terminate()
        self.web.wait(15)

    def start_workers(self):
        self.start("qcluster", PY, "manage.py", "qcluster")
        self.start("qcluster-migrations", PY, "manage.py", "qcluster", env={"Q_CLUSTER_NAME": "migrations"})

    def request(self, method, path, body=None, token=None, headers=None):
        """(status, headers, parsed JSON or text) of one HTTP request to the site."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                status, hdrs, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, hdrs, raw = exc.code, exc.headers, exc.read()
        text = raw.decode()
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def stop(self, grace=8):
        """SIGTERM every process, SIGKILL what still runs after ``grace`` seconds in all.

        Nothing after a test needs them to stop cleanly; tests/kvmweb/test_graceful_stop.py
        and tests/kvmweb/test_worker_shutdown.py prove daphne's and the workers' prompt stop."""
        for proc, _log in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc, log in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))

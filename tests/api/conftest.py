import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.test import Client

from tests.receivers import webhook  # noqa: F401 - shared fixture


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Rate-limit and failure counters live in the cache: each test starts with none."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def token_for(db):
    """token_for(user) -> the text of a fresh API token of that user."""
    from api import services

    def make(user, **kwargs):
        return services.do_create_token(user, "test", actor=user, **kwargs)[1]

    return make


@pytest.fixture
def api(token_for):
    """api(user) -> a client that sends that user's fresh token as a Bearer header."""

    def make(user):
        return Client(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")

    return make


@pytest.fixture
def clean_preflight(monkeypatch):
    """The checklist with nothing blocking (these tests exercise the API, not the checks)."""
    from migrations_app import preflight
    from migrations_app.preflight import Report

    monkeypatch.setattr(
        preflight,
        "run_preflight",
        lambda plan, **kw: Report(results=[], verdict="pass", started_at="", duration_ms=0, plan={}),
    )


# ----------------------------------------------------------------------------- live site


ROOT = Path(__file__).resolve().parents[2]


class LiveSite:
    """kvmweb in its own data dir (file SQLite) served by a real daphne on loopback, with
    real workers when asked; every process started here and stopped by its PID."""

    def __init__(self, tmp):
        self.dir = tmp
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "KVMWEB_SQLITE_PATH")
        }
        self.env.update(
            KVMWEB_DATA_DIR=str(tmp),
            KVMWEB_ALLOWED_HOSTS="127.0.0.1",
            DJANGO_SETTINGS_MODULE="kvmweb.settings",
            PYTHONUNBUFFERED="1",
        )
        self.procs = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.manage("migrate", "--no-input", "-v", "0")

    def manage(self, *args, timeout=180):
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    def python(self, code):
        out = self.manage("shell", "-v", "0", "-c", code)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else None

    def start(self, name, *args, env=None):
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            list(args), cwd=ROOT, env=dict(self.env, **(env or {})), stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append((proc, log))
        return proc

    def start_web(self):
        proc = self.start(
            "daphne",
            str(Path(sys.executable).parent / "daphne"),
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
            "kvmweb.asgi:application",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, self.logs()
                time.sleep(0.1)

    def start_workers(self):
        self.start("qcluster", sys.executable, "manage.py", "qcluster")
        self.start(
            "qcluster-migrations",
            sys.executable,
            "manage.py",
            "qcluster",
            env={"Q_CLUSTER_NAME": "migrations"},
        )

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

    def stop(self):
        for proc, _log in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))


@pytest.fixture
def live_site(tmp_path):
    site = LiveSite(tmp_path)
    yield site
    site.stop()

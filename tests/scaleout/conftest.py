"""Scale-out tests: the same code on PostgreSQL and Redis, with several real processes.

They run only when DATABASE_URL (PostgreSQL) and REDIS_URL are set, which `make test`
does in its second pass (scripts/services.sh starts both on loopback). Without them every
test here is skipped with that reason, so the plain SQLite run stays self-contained.

Processes started here (daphne, qcluster, helper writers) point at pytest-django's test
database, so the tests that use them are transactional (committed data is what another
process sees). Every process is stopped by its PID when the test ends.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SKIP_REASON = (
    "scale-out tests need PostgreSQL and Redis: set DATABASE_URL and REDIS_URL "
    "(`make test` does, via scripts/services.sh)"
)


def services_available():
    return bool(os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so `-m scaleout` sees the marker
def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item, not only this directory's: filter by path.
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.scaleout)
            if not services_available():
                item.add_marker(skip)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def child_env(**extra):
    """The environment for a child process: same settings, but DATABASE_URL names the
    test database pytest-django created (the children must see the test's rows)."""
    from django.db import connection

    env = dict(os.environ)
    url = urlparse(env["DATABASE_URL"])
    env["DATABASE_URL"] = urlunparse(url._replace(path="/" + connection.settings_dict["NAME"]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Processes:
    """Start children, stop exactly those children (by PID) at the end."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, args, name, **env):
        log = open(self.tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop_all)
        proc = subprocess.Popen(
            args, cwd=ROOT, env=child_env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.name, proc.log, proc.log_path = name, log, self.tmp_path / f"{name}.log"
        self.procs.append(proc)
        return proc

    def daphne(self, name="daphne", **env):
        port = free_port()
        proc = self.start(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "kvmweb.asgi:application"],
            name,
            **env,
        )
        wait_port(port, proc)
        proc.port = port
        return proc

    def qcluster(self, cluster="migrations", name=None, **env):
        extra = {"Q_CLUSTER_NAME": cluster} if cluster != "default" else {}
        extra["KVMWEB_LOG_LEVEL"] = "INFO"  # its "running." line, which wait_running reads
        extra.update(env)
        return self.start([sys.executable, "manage.py", "qcluster"], name or f"qcluster-{cluster}", **extra)

    def wait_running(self, *clusters, timeout=120.0):
        """Wait until every qcluster in ``clusters`` logged "running." (its workers and
        its poller started): a fixed sleep is too short on a loaded machine."""
        deadline = time.monotonic() + timeout
        for proc in clusters:
            while "] running." not in proc.log_path.read_text(errors="replace"):
                assert proc.poll() is None, f"{proc.name} exited\n{self.logs()}"
                assert time.monotonic() < deadline, (
                    f"{proc.name} not running after {timeout} s\n{self.logs()}"
                )
                time.sleep(0.1)

    def python(self, code, name, **env):
        return self.start([sys.executable, "-c", code], name, **env)

    def logs(self):
        return "\n".join(
            f"--- {p.name} ---\n{p.log_path.read_text(errors='replace')[-3000:]}" for p in self.procs
        )

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # Its own session (start_new_session): the group is exactly this child
                # and what it forked (qcluster workers), nothing else.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            proc.log.close()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
def close_thread_connections():
    """Call it at the end of every helper thread: a connection left open by a thread keeps
    the test database busy and PostgreSQL then refuses to drop it."""
    from django.db import connections

    return connections.close_all

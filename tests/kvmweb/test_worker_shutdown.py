"""A real `manage.py qcluster` stops promptly on SIGTERM while its workers run the
minute-long watch loops (reconcile, notification dispatch): the loops look at the
cluster's stop event (kvmweb/workers.py) instead of sleeping through it, also after one
of its workers was killed in that wait."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmweb import workers

ROOT = Path(__file__).resolve().parents[2]
LOOPS = ("migrations_app.tasks.reconcile_watch", "notifications.tasks.dispatch_watch")


@pytest.fixture
def site(tmp_path):
    """A kvmweb of its own: a file SQLite DB and data dir in tmp_path, migrated."""
    env = dict(os.environ, KVMWEB_SQLITE_PATH=str(tmp_path / "db.sqlite3"), KVMWEB_DATA_DIR=str(tmp_path))
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.pop("Q_CLUSTER_NAME", None)

    def manage(*args):
        r = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    manage("migrate", "--noinput", "-v", "0")
    return env, manage


@pytest.mark.parametrize("first", ["nothing", "a worker killed"])
def test_it_stops_within_bound_while_watch_loops_run(site, tmp_path, first):
    """SIGTERM to the qcluster process only (scripts/run.sh, systemd's KillMode=mixed).
    ``a worker killed``: before it, the worker running the notification dispatcher is
    killed (SIGKILL, as the OOM killer does) in its wait between two passes, and the
    cluster replaces it: the cluster's stop must not wait for the dead one to wake
    (kvmweb/workers.py wait)."""
    env, manage = site
    enqueue = "; ".join(f"async_task({name!r})" for name in LOOPS)
    manage("shell", "-c", f"from django_q.tasks import async_task; {enqueue}")
    log_path = tmp_path / "qcluster.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180  # a loaded machine starts the cluster slowly
        while not all(f"'{name}'" in log_path.read_text() for name in LOOPS):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the watch loops never started:\n" + log_path.read_text()
            time.sleep(0.2)
        time.sleep(1)  # both loops past their first pass, sleeping between passes
        if first == "a worker killed":
            log = log_path.read_text()
            pids = dict(re.findall(r"(Process-\w+) ready for work at (\d+)", log))
            name = re.search(r"(Process-\w+) processing \S+ 'notifications.tasks.dispatch_watch'", log)[1]
            os.kill(int(pids[name]), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while "reincarnated worker" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)  # without the stop event the loops hold it ~55 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"qcluster still running 40 s after SIGTERM ({first}):\n" + log_path.read_text())
        took = time.monotonic() - t0
        while _group_alive(proc.pid):  # its workers and pusher too
            assert time.monotonic() - t0 < 40, "qcluster's processes still running 40 s after SIGTERM"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert took < 40, took
    print(f"qcluster exited {took:.1f} s after SIGTERM ({first} before)")


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_it_sleeps_outside_a_worker():
    """No cluster on the stack (this test process): wait() is a plain sleep."""
    assert workers.cluster_stop_event() is None
    t0 = time.monotonic()
    assert workers.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.05
    assert workers.stopping() is False

"""Shared fixtures of the migration tests: a real worker process against the KVM lab.

`Cluster` is a kvmweb of its own (a file SQLite DB with the lab hosts registered) that
tests drive through real processes: `manage.py` commands, a real migrations qcluster, or
tests/migrations_app/crash_worker.py (a worker that dies at a journal step).
"""

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lab as labkit
from hosts import services as host_services
from hosts.models import VM, Host, HostGroup
from migrations_app.models import MigrationJob

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hosts(lab, db):
    """lab-a and lab-b registered in this test's kvmweb (no inventory sync yet)."""
    return {h: host_services.do_register_host(h, lab.uri(h), sync=False) for h in ("lab-a", "lab-b")}


@pytest.fixture
def world(db, alice):
    """Hosts ha (group g1) and hb (group g2), test-driver URIs; web1 (alice's) runs on ha."""
    g1, g2 = HostGroup.objects.create(name="g1"), HostGroup.objects.create(name="g2")
    a = Host.objects.create(name="ha", uri="test:///default", group=g1)
    b = Host.objects.create(name="hb", uri="test:///other", group=g2)
    vm = VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web1", host=a, state="running", owner_user=alice
    )
    return {"a": a, "b": b, "vm": vm, "g1": g1, "g2": g2}


@pytest.fixture
def passing_preflight(monkeypatch):
    """run_preflight answers a pass without contacting any host (for service, page, API
    and command tests of what happens around the checklist)."""
    import kvmweb.urls  # noqa: F401  (views bind names when the URLconf loads: load it first)
    from migrations_app.preflight import CheckResult, Report

    def answer(plan, **kwargs):
        results = [CheckResult("connection", "Connections", "pass", "ok")]
        return Report(results=results, verdict=Report.verdict_of(results), started_at="", duration_ms=1)

    monkeypatch.setattr("migrations_app.preflight.run_preflight", answer)
    return answer


SECRET_URI = "test:///s1"


@pytest.fixture
def secret_move(alice, bob):
    """secret_move(**fields) -> a job moving alice-web, now alice's, from the secret host
    s1 (outside alice's scope; tests/accounts/world.py) to p1, its error and a log line
    naming s1 and its URI: what host masking must hide from her."""
    from migrations_app.models import JobEvent
    from tests.accounts.world import build

    def make(**fields):
        w = build(alice, bob)
        job = MigrationJob.objects.create(
            vm=w.alice_web,
            vm_name=w.alice_web.name,
            source=w.s1,
            source_name=w.s1.name,
            target=w.p1,
            target_name=w.p1.name,
            mode=MigrationJob.LIVE,
            status=MigrationJob.RUNNING,
            error=f"libvirt at {SECRET_URI} answered slowly",
            **fields,
        )
        JobEvent.objects.create(job=job, message=f"Connected to {w.s1.name} ({SECRET_URI}).")
        return job

    return make


@pytest.fixture
def make_job(db):
    """make_job(status="running", mode="live", **fields) -> a MigrationJob of web1 from
    host ha to hb (test-driver URIs: nothing is contacted)."""
    made = {}

    def _make(status=MigrationJob.RUNNING, mode="live", **fields):
        if not made:
            made["a"] = Host.objects.create(name="ha", uri="test:///default")
            made["b"] = Host.objects.create(name="hb", uri="test:///other")
        a, b = made["a"], made["b"]
        vm = VM.objects.create(
            uuid=fields.pop("uuid", None) or f"6695eb01-f6a4-8304-79aa-{VM.objects.count():012d}",
            name=fields.pop("vm_name", "web1"),
            host=a,
            state="running",
        )
        return MigrationJob.objects.create(
            vm=vm,
            vm_name=vm.name,
            source=a,
            source_name=a.name,
            target=b,
            target_name=b.name,
            mode=mode,
            status=status,
            **fields,
        )

    return _make


class Cluster:
    """A file SQLite DB of its own, hosts registered, and a real migrations qcluster."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.db = tmp / "kvmweb.sqlite3"
        self.env = dict(os.environ, KVMWEB_SQLITE_PATH=str(self.db), KVMWEB_ADMIN_PASSWORD="x" * 16)
        self.env.pop("DATABASE_URL", None)
        self.env.pop("REDIS_URL", None)
        self.proc = None

    def manage(self, *args, check=True, timeout=120, **kw):
        r = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=dict(self.env, **kw.pop("env", {})),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed: {r.stdout}{r.stderr}")
        return r

    def start(self):
        log = open(self.tmp / "qcluster.log", "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env=dict(
                self.env, Q_CLUSTER_NAME="migrations", KVMWEB_LOG_LEVEL="INFO"
            ),  # workers_paused reads it
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL takes the workers too
        )

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    @contextlib.contextmanager
    def workers_paused(self):
        """The worker processes of this qcluster stopped (SIGSTOP) for the block, then
        continued. Idle, they wait on the cluster's in-memory queue and hold no database
        lock; the pusher still takes messages off the broker. A job queued meanwhile and
        claimed by the block's own process (migrate_vm --wait) is then not raced by a
        worker, which on a loaded machine claimed it first; once continued, the worker's
        copy of the message finds it taken. Only processes of this cluster's own process
        group that its log names as workers are signalled."""
        deadline = time.monotonic() + 120  # a cluster just (re)started logs its workers soon
        while True:
            log = (self.tmp / "qcluster.log").read_text(errors="replace")
            pids = []
            for pid in {int(p) for p in re.findall(r"ready for work at (\d+)", log)}:
                try:
                    if os.getpgid(pid) == self.proc.pid:
                        pids.append(pid)
                except ProcessLookupError:
                    pass  # a worker of an earlier start of this cluster
            if pids:
                break
            assert time.monotonic() < deadline, (
                f"no worker of the running qcluster in its log:\n{log[-2000:]}"
            )
            time.sleep(0.1)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def queue_drained(self, timeout):
        """Wait until the migrations queue holds no message (each one processed)."""
        deadline = time.monotonic() + timeout
        while self.q("select count(*) from django_q_ormq where key = 'migrations'")[0][0]:
            assert time.monotonic() < deadline, "the migrations queue still holds messages"
            time.sleep(0.1)

    def stop(self):
        """The end of the fixture: its DB is thrown away, so the cluster is killed at once
        (a graceful stop is tested in tests/kvmweb/test_worker_shutdown.py; waiting for
        idle workers to honour SIGTERM cost each module up to 15 s here)."""
        self.kill()

    def q(self, sql, *args):
        con = sqlite3.connect(self.db, timeout=20)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def job(self, job_id):
        row = self.q(
            "select status, percent, error, finished_at, progress_seq from migrations_app_migrationjob where id=?",
            job_id,
        )[0]
        return dict(zip(["status", "percent", "error", "finished_at", "progress_seq"], row, strict=True))

    def events(self, job_id):
        return self.q("select at, message from migrations_app_jobevent where job_id=? order by id", job_id)

    def wait(self, job_id, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if cond(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id}: {what} not reached: {job}"
            time.sleep(0.05)

    def migrate(self, vm, target, *args):
        r = self.manage("migrate_vm", vm, target, "--json", "--ack-all", *args)
        return json.loads(r.stdout.strip().splitlines()[-1])["id"]


_template = {}  # the first prepared DB of this session, copied by the next ones


def _prepared(tmp):
    """Migrated, the admin made, lab-a and lab-b registered: the same commands an operator
    runs, in one process (each manage.py start costs seconds on a loaded machine). The
    first call of a session keeps its DB as a template; later calls copy it (SQLite's
    backup API: consistent even in WAL mode) instead of migrating again."""
    c = Cluster(tmp)
    if "db" in _template:
        _copy_db(_template["db"], c.db)
        return c
    hosts = "; ".join(
        f"call_command('add_host', {h!r}, {labkit.uri(h)!r}, '--no-sync')" for h in ("lab-a", "lab-b")
    )
    c.manage(
        "shell",
        "-c",
        "from django.core.management import call_command; "
        f"call_command('migrate', '--noinput', verbosity=0); call_command('ensure_admin'); {hosts}",
        timeout=300,  # every migration on a new DB: 43 s with two CPU burners beside other tests
    )
    template = tmp.parent / f"{tmp.name}-template.sqlite3"
    _copy_db(c.db, template)
    _template["db"] = template
    return c


def _copy_db(source, target):
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


@pytest.fixture(scope="module")
def cluster(lab, tmp_path_factory):
    """A kvmweb with its own DB and a running migrations qcluster."""
    c = _prepared(tmp_path_factory.mktemp("mjcluster"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def workerless(lab, tmp_path_factory):
    """A kvmweb with its own DB and no worker: tests run workers themselves."""
    return _prepared(tmp_path_factory.mktemp("workerless"))

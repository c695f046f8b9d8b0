#!/usr/bin/env python3
"""Page throughput: the dashboard and the VM list with 5,000 VMs, under `wrk`, while
migrations write progress.

For each backend (PostgreSQL + Redis, and the embedded SQLite default) a child process
builds a fresh database: 50 hosts, 5,000 VMs (100 owned by a self-service user), 300
finished jobs, and M running jobs whose "worker" is a writer process doing exactly what
the migration runner does four times a second (update the row + a progress sample in one
transaction, then publish_job). Then it starts D daphne processes and runs one `wrk` per
daphne at the same time against each page, signed in (session cookie) as an operator
(sees everything) and as the self-service user (scoped queries). Before measuring, each
page is fetched once and must answer 200 (a redirect to the login page would otherwise
count as success in wrk).

Prints requests/s (sum over the daphnes), p50/p95/p99 latency (worst daphne) and every
error wrk saw (connect/read/write/timeout, and non-2xx/3xx statuses).

Needs `wrk` (Debian package; installed here with apt-get when missing, as root). Uses
DATABASE_URL/REDIS_URL when set, else starts a throwaway PostgreSQL + Redis with
scripts/services.sh. Everything started is stopped by PID.

Run: .venv/bin/python benchmarks/page_throughput.py [--backends pg sqlite] [--seconds 15]
     [--connections 8] [--daphnes 2] [--migrations 8] [--vms 5000]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python")
WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format(
    "RESULT %d %d %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
"""
# Every list page, and who may see it (the self-service user has no audit history page).
PAGES = [
    ("/", "all"),
    ("/vms/", "all"),
    ("/vms/?page=60", "all"),
    ("/vms/?state=running", "all"),
    ("/vms/?sort=-memory", "all"),
    ("/vms/?sort=host&q=vm-0", "all"),
    ("/hosts/", "all"),
    ("/migrations/", "all"),
    ("/audit/", "bench-operator"),
]
BUDGET_MS = 100  # server time p95 per page, one request at a time
SERIAL = 30  # requests per page for the server time


def ensure_wrk():
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        raise SystemExit("wrk is missing: apt-get install wrk")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"], env=env, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"process {proc.pid} did not listen on {port}") from None
            time.sleep(0.1)


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the progress writer


def writer(job_id, hz):
    """Child: a migration's progress writes at `hz` until killed."""
    import django

    django.setup()
    from django.db import transaction
    from django.db.models import F
    from django.utils import timezone

    from migrations_app.models import MigrationJob, ProgressSample
    from migrations_app.streaming import publish_job

    total, i, t0 = 8 << 30, 0, time.monotonic()
    while True:
        i += 1
        remaining = max(0, total - i * (64 << 20))
        with transaction.atomic():
            MigrationJob.objects.filter(pk=job_id).update(
                phase="memory",
                percent=100 * (total - remaining) / total,
                data_total=total,
                data_processed=total - remaining,
                data_remaining=remaining,
                rate=256 << 20,
                iteration=1 + i // 40,
                progress_at=timezone.now(),
                heartbeat_at=timezone.now(),
                progress_seq=F("progress_seq") + 1,
            )
            ProgressSample.objects.create(
                job_id=job_id, t=time.monotonic() - t0, rate=256 << 20, remaining=remaining
            )
        publish_job(job_id)
        time.sleep(1 / hz)


# ------------------------------------------------------------------ one backend


def seed(n_vms, n_hosts, n_running):
    """Hosts, VMs, finished and running jobs; returns (running job ids, cookies)."""
    import random
    import uuid

    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.test import Client
    from django.utils import timezone

    from hosts.models import VM, Host
    from kvmweb.accounts.roles import OPERATOR, SELF_SERVICE
    from migrations_app.models import MigrationJob

    call_command("migrate", verbosity=0)
    rng = random.Random(7)
    operator = User.objects.create_user("bench-operator", password="x" * 20)
    operator.groups.add(Group.objects.get(name=OPERATOR))
    owner = User.objects.create_user("bench-owner", password="x" * 20)
    owner.groups.add(Group.objects.get(name=SELF_SERVICE))
    hosts = Host.objects.bulk_create(
        Host(
            name=f"kvm{i:03d}",
            uri=f"qemu+ssh://root@kvm{i:03d}.example.internal/system",
            status=Host.REACHABLE,
            hostname=f"kvm{i:03d}.example.internal",
            cpus=64,
            memory_total=512 << 30,
            memory_free=128 << 30,
        )
        for i in range(n_hosts)
    )
    states = ["running"] * 7 + ["shutoff"] * 2 + ["paused"]
    vms = VM.objects.bulk_create(
        [
            VM(
                uuid=uuid.UUID(int=rng.getrandbits(128)),
                name=f"vm-{i:05d}",
                host=hosts[i % n_hosts],
                state=rng.choice(states),
                vcpus=rng.choice([1, 2, 4, 8]),
                memory=rng.choice([1, 2, 4, 8, 16]) << 30,
                owner_user=owner if i % 50 == 0 else None,
            )
            for i in range(n_vms)
        ],
        batch_size=1000,
    )
    now = timezone.now()
    finished = []
    for i in range(300):
        vm = vms[(i * 17) % n_vms]
        src, dst = vm.host, hosts[(hosts.index(vm.host) + 1) % n_hosts]
        finished.append(
            MigrationJob(
                vm=vm,
                vm_name=vm.name,
                source=src,
                source_name=src.name,
                target=dst,
                target_name=dst.name,
                mode=MigrationJob.LIVE,
                status=rng.choice([MigrationJob.SUCCEEDED] * 9 + [MigrationJob.FAILED]),
                started_at=now,
                finished_at=now,
                requested_by=operator,
                requested_by_name=operator.username,
            )  # fmt: skip
        )
    MigrationJob.objects.bulk_create(finished)
    running = []
    for i in range(n_running):
        vm = vms[1 + i * 50]  # owned by nobody; distinct VMs
        src, dst = vm.host, hosts[(hosts.index(vm.host) + 1) % n_hosts]
        running.append(
            MigrationJob.objects.create(
                vm=vm,
                vm_name=vm.name,
                source=src,
                source_name=src.name,
                target=dst,
                target_name=dst.name,
                mode=MigrationJob.LIVE,
                status=MigrationJob.RUNNING,
                started_at=now,
                heartbeat_at=now,
                requested_by=operator,
                requested_by_name=operator.username,
            ).pk  # fmt: skip
        )
    cookies = {}
    for user in (operator, owner):
        client = Client()
        client.force_login(user)
        cookies[user.username] = client.cookies["sessionid"].value
    return running, cookies


def wrk(port, path, cookie, seconds, connections, script):
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", script]
        + ["-H", f"Cookie: sessionid={cookie}", f"http://127.0.0.1:{port}{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def parse(output):
    for line in output.splitlines():
        if line.startswith("RESULT "):
            n = [int(x) for x in line.split()[1:]]
            return {
                "requests": n[0],
                "seconds": n[1] / 1e6,
                "p50": n[2] / 1000,
                "p95": n[3] / 1000,
                "p99": n[4] / 1000,
                "errors": dict(zip(["connect", "read", "write", "status", "timeout"], n[5:], strict=True)),
            }
    raise RuntimeError(f"wrk printed no result:\n{output}")


def run_backend(args):
    """Child process for one backend (settings are per process)."""
    import django

    django.setup()
    from django.conf import settings

    running, cookies = seed(args.vms, args.hosts, args.migrations)
    vendor = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[1]
    layer = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[1]
    work = Path(tempfile.mkdtemp(prefix="kvmweb-bench-pages-"))
    script = work / "report.lua"
    script.write_text(WRK_LUA)
    procs, results = [], []
    try:
        daphnes = []
        for n in range(args.daphnes):
            port = free_port()
            log = open(work / f"daphne-{n}.log", "wb")  # noqa: SIM115 (closed with the process)
            proc = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "daphne"), "-b", "127.0.0.1", "-p", str(port), "kvmweb.asgi:application"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(proc)
            daphnes.append((proc, port))
        for proc, port in daphnes:
            wait_port(port, proc)
        for job_id in running:
            procs.append(subprocess.Popen([PY, __file__, "--writer", str(job_id)], cwd=ROOT))
        time.sleep(2)
        for user, cookie in cookies.items():
            for path, who in PAGES:
                if who not in ("all", user):
                    continue
                for _proc, port in daphnes:  # it must really be the page, not a redirect
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{port}{path}", headers={"Cookie": f"sessionid={cookie}"}
                    )
                    with urllib.request.urlopen(req, timeout=30) as response:
                        body = response.read()
                        assert response.status == 200 and response.url.endswith(path), (path, response.url)
                        assert b"vm-0" in body or not path.startswith("/vms/"), (user, path)
                # Server time: one request at a time (no queueing behind other requests).
                # The daphnes' CPU seconds over these requests give the code's cost per
                # request, which the machine's load hardly changes.
                serial = []
                serial_cpu0 = sum(cpu_seconds(p.pid) for p, _ in daphnes)
                for i in range(SERIAL):
                    port = daphnes[i % len(daphnes)][1]
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{port}{path}", headers={"Cookie": f"sessionid={cookie}"}
                    )
                    t = time.perf_counter()
                    with urllib.request.urlopen(req, timeout=30) as response:
                        response.read()
                    serial.append((time.perf_counter() - t) * 1000)
                serial.sort()
                cpu_per_request = (sum(cpu_seconds(p.pid) for p, _ in daphnes) - serial_cpu0) / SERIAL * 1000
                cpu0 = {p.pid: cpu_seconds(p.pid) for p, _ in daphnes}
                t0 = time.monotonic()
                runs = [
                    wrk(port, path, cookie, args.seconds, args.connections, script) for _, port in daphnes
                ]
                outs = [parse(r.communicate()[0]) for r in runs]
                wall = time.monotonic() - t0
                cpu = [(cpu_seconds(p.pid) - cpu0[p.pid]) / wall * 100 for p, _ in daphnes]
                errors = {k: sum(o["errors"][k] for o in outs) for k in outs[0]["errors"]}
                results.append(
                    {
                        "backend": f"{vendor}+{layer}",
                        "user": user,
                        "path": path,
                        "rps": sum(o["requests"] / o["seconds"] for o in outs),
                        "p50": max(o["p50"] for o in outs),
                        "p95": max(o["p95"] for o in outs),
                        "p99": max(o["p99"] for o in outs),
                        "requests": sum(o["requests"] for o in outs),
                        "errors": errors,
                        "cpu": cpu,
                        "load": os.getloadavg()[0],
                        "cpu_ms": cpu_per_request,
                        "server_p50": serial[len(serial) // 2],
                        "server_p95": serial[max(0, int(len(serial) * 0.95) - 1)],
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["pg", "sqlite"], choices=["pg", "sqlite"])
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--migrations", type=int, default=8, help="running jobs writing progress at 4 Hz")
    parser.add_argument("--daphnes", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=8, help="per daphne")
    parser.add_argument("--run-backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--writer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        return writer(args.writer, 4.0)
    if args.run_backend:
        return run_backend(args)
    ensure_wrk()
    print(
        f"page throughput: {args.vms} VMs on {args.hosts} hosts, {args.migrations} running jobs writing "
        f"progress at 4 Hz, {args.daphnes} daphne processes, wrk {args.connections} connections each for "
        f"{args.seconds} s; {os.cpu_count()} CPUs shared by everything"
    )
    print(
        f"server time: {SERIAL} requests one at a time per page (budget: p95 <= {BUDGET_MS} ms); "
        "load: wrk latency includes queueing behind the other connections"
    )
    print(f"{'backend':<30} {'user':<15} {'page':<24} {'srv p50':>7} {'srv p95':>7} {'CPU ms':>6} {'req/s':>7} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'p99 ms':>7} {'errors':>6} {'load':>5}  daphne CPU")  # fmt: skip
    failures = []
    for backend in args.backends:
        data_dir = tempfile.mkdtemp(prefix="kvmweb-bench-pages-data-")
        env = dict(os.environ, KVMWEB_DATA_DIR=data_dir)
        env.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")  # another one to compare settings
        services_dir = None
        if backend == "sqlite":
            env.pop("DATABASE_URL", None)
            env.pop("REDIS_URL", None)
        elif not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
            services_dir = tempfile.mkdtemp(prefix="kvmweb-bench-services-")
            out = subprocess.run(
                ["bash", str(ROOT / "scripts" / "services.sh"), "start"],
                env=dict(env, KVMWEB_SERVICES_DIR=services_dir), check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            for line in out.splitlines():
                key, value = line.removeprefix("export ").split("=", 1)
                env[key] = value
        try:
            proc = subprocess.Popen(
                [PY, __file__, "--run-backend", "--vms", str(args.vms), "--hosts", str(args.hosts),
                 "--migrations", str(args.migrations), "--daphnes", str(args.daphnes),
                 "--seconds", str(args.seconds), "--connections", str(args.connections)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            for line in proc.stdout:
                if not line.startswith("{"):
                    print(line, end="")
                    continue
                r = json.loads(line)
                errors = sum(r["errors"].values())
                verdict = ""
                if r["requests"] == 0:
                    verdict = "  FAIL: no request completed"
                elif r["server_p95"] > BUDGET_MS:
                    verdict = f"  FAIL: server p95 over {BUDGET_MS} ms"
                if verdict:
                    failures.append(f"{r['backend']} {r['user']} {r['path']}:{verdict[7:]}")
                rps = f"{r['rps']:>7.1f}" if r["requests"] else f"{'FAIL':>7}"
                print(
                    f"{r['backend']:<30} {r['user']:<15} {r['path']:<24} {r['server_p50']:>7.1f} "
                    f"{r['server_p95']:>7.1f} {r['cpu_ms']:>6.1f} {rps} {r['p50']:>7.1f} {r['p95']:>7.1f} {r['p99']:>7.1f} {errors:>6} "
                    f"{r['load']:>5.1f}  "
                    + " ".join(f"{c:.0f}%" for c in r["cpu"])
                    + (f"  {r['errors']}" if errors else "")
                    + verdict,
                    flush=True,
                )
            proc.wait()
            if proc.returncode:
                failures.append(f"{backend}: the benchmark process failed (exit {proc.returncode})")
        finally:
            if services_dir:
                subprocess.run(
                    ["bash", str(ROOT / "scripts" / "services.sh"), "stop"],
                    env=dict(env, KVMWEB_SERVICES_DIR=services_dir),
                    check=False,
                )
            shutil.rmtree(data_dir, ignore_errors=True)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"all pages: server p95 <= {BUDGET_MS} ms, every page completed requests under load")
    return 0


if __name__ == "__main__":
    sys.exit(main())

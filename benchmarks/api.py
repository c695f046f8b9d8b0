#!/usr/bin/env python3
"""REST API and /metrics cost on the embedded default (file SQLite, one daphne).

Builds a fresh site in a temp dir: 50 hosts, 5,000 VMs, 2,000 finished jobs and 20,000
audit events. Then, against one daphne on loopback:

* `wrk` (C connections, S seconds) on the VM list as JSON with an API token
  (`/api/v1/vms/`), on the same list as the HTML page with a session cookie (`/vms/`), and
  on the job list (`/api/v1/jobs/`): requests/s and p50/p99, so the token lookup and the
  serializer are compared with the page they mirror;
* 20 sequential `/metrics` scrapes (the database figures are aggregated at scrape time):
  p50 and max milliseconds, and the size of the answer.

Run: .venv/bin/python benchmarks/api.py [--seconds 10] [--connections 4]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
SEED = r"""
import json, random, uuid, hashlib
from django.contrib.auth.models import Group, User
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone
from hosts.models import Host, VM
from migrations_app.models import MigrationJob
from kvmweb.audit.models import AuditEvent
random.seed(7)
ops = User.objects.create_user("ops", password="x" * 20)
ops.groups.add(Group.objects.get(name="Operator"))
hosts = Host.objects.bulk_create([Host(name=f"h{i:02d}", uri=f"test:///h{i}", status="reachable") for i in range(50)])
vms = VM.objects.bulk_create([VM(uuid=uuid.uuid4(), name=f"vm-{i:05d}", host=hosts[i % 50], state="running") for i in range(5000)])
now = timezone.now()
MigrationJob.objects.bulk_create([
    MigrationJob(vm=vms[i], vm_name=vms[i].name, source=hosts[0], source_name="h00", target=hosts[1], target_name="h01",
                 mode=random.choice(["live", "live-copy", "cold", "offline"]),
                 status=random.choice(["succeeded"] * 8 + ["failed", "cancelled"]), finished_at=now,
                 elapsed_ms=random.randint(1000, 600000), downtime_ms=random.randint(5, 5000),
                 data_processed=random.randint(1, 10**10))
    for i in range(2000)])
AuditEvent.objects.bulk_create([
    AuditEvent(at=now, action="bench.event", actor_name="ops", outcome=random.choice(["success", "failure"]),
               prev_hash="0" * 64, hash=hashlib.sha256(str(i).encode()).hexdigest())
    for i in range(20000)])
session = SessionStore()
session["_auth_user_id"] = str(ops.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = ops.get_session_auth_hash()
session.create()
print(json.dumps({"session": session.session_key}))
"""
WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="kvmweb-api-bench-"))
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "KVMWEB_SQLITE_PATH")
    }
    env.update(KVMWEB_DATA_DIR=str(tmp), KVMWEB_ALLOWED_HOSTS="127.0.0.1", KVMWEB_API_RATE="1000000/min")

    def manage(*argv):
        done = subprocess.run(
            [PY, "manage.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    manage("migrate", "--no-input", "-v", "0")
    session = json.loads(manage("shell", "-v", "0", "-c", SEED).splitlines()[-1])["session"]
    token = manage("api_token", "ops")
    port = free_port()
    log = open(tmp / "daphne.log", "wb")  # noqa: SIM115
    web = subprocess.Popen(
        [str(ROOT / ".venv/bin/daphne"), "-b", "127.0.0.1", "-p", str(port), "kvmweb.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("daphne did not start") from None
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        lua = tmp / "report.lua"
        lua.write_text(WRK_LUA)
        cases = [
            ("GET /api/v1/vms/ (token, JSON, 50 per page)", "/api/v1/vms/", f"Authorization: Bearer {token}"),
            ("GET /vms/ (session, HTML, 50 per page)", "/vms/", f"Cookie: sessionid={session}"),
            ("GET /api/v1/jobs/ (token, JSON)", "/api/v1/jobs/", f"Authorization: Bearer {token}"),
        ]
        print(
            f"loadavg before: {os.getloadavg()[0]:.2f}; {args.connections} connections, {args.seconds} s each"
        )
        for label, path, header in cases:
            check = urllib.request.Request(base + path, headers=dict([header.split(": ", 1)]))
            with urllib.request.urlopen(check, timeout=30) as r:
                assert r.status == 200 and r.url.endswith(path), (r.status, r.url)
            out = subprocess.run(
                [
                    "wrk",
                    "-t1",
                    f"-c{args.connections}",
                    f"-d{args.seconds}s",
                    "-H",
                    header,
                    "-s",
                    str(lua),
                    base + path,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            n, dur, p50, p99, bad = (int(x) for x in out.split("RESULT ")[1].split())
            print(
                f"{label:48s} {n / (dur / 1e6):7.1f} req/s  p50 {p50 / 1000:6.1f} ms  p99 {p99 / 1000:6.1f} ms  non-2xx {bad}"
            )
        times, size = [], 0
        for _ in range(20):
            t0 = time.perf_counter()
            with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
                size = len(r.read())
            times.append((time.perf_counter() - t0) * 1000)
        print(
            f"/metrics (2,000 jobs, 20,000 audit events, 50 hosts): p50 {statistics.median(times):.1f} ms, "
            f"max {max(times):.1f} ms, {size} bytes"
        )
        print(f"loadavg after: {os.getloadavg()[0]:.2f}")
    finally:
        web.terminate()
        web.wait(20)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

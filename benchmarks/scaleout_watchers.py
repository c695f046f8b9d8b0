#!/usr/bin/env python3
"""Scale-out streaming benchmark: 500 WebSocket watchers of one running job, spread over
two daphne processes, on PostgreSQL + Redis (channels-redis).

A writer process does what the migration worker does four times a second: update the
job row (progress fields, progress_seq + 1) plus a ProgressSample in one transaction,
note the commit time, call publish_job() (a Redis Pub/Sub message carrying the row to
every daphne process, which renders it for its watchers). Watchers are raw WebSocket
clients on loopback (one asyncio process), signed in with a real session, connected
round-robin to the daphne processes; each notes when the payload carrying each
progress_seq arrives. Latency = arrival - commit (one
clock: everything runs on this machine). "coalesced" counts writes a watcher never saw as
their own message (the poller sends the newest state, so a fast burst can fold two
writes into one message; the browser still ends on the right figures). CPU per process
comes from /proc/<pid>/stat (utime + stime) over the writer's run, as % of one core.

Uses DATABASE_URL / REDIS_URL when set; otherwise starts a throwaway PostgreSQL + Redis
with scripts/services.sh (own temp dir) and stops them at the end. Everything it starts
is stopped by PID.

Run: .venv/bin/python benchmarks/scaleout_watchers.py [--watchers 500] [--daphnes 2]
     [--seconds 20] [--hz 4]
"""

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python")
SEQ = re.compile(r'data-seq="(\d+)"')

# The writer (the worker's progress writes) and the small helpers are shared with the
# embedded-default benchmark.
from progress_latency import cpu_seconds, free_port, percentile, setup_django, writer  # noqa: E402
from progress_latency import prepare as _prepare  # noqa: E402


def start_services():
    """A throwaway PostgreSQL + Redis (scripts/services.sh); returns its dir."""
    services_dir = tempfile.mkdtemp(prefix="kvmweb-bench-services-")
    env = dict(os.environ, KVMWEB_SERVICES_DIR=services_dir)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "services.sh"), "start"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        os.environ[key] = value
    return services_dir


def stop_services(services_dir):
    env = dict(os.environ, KVMWEB_SERVICES_DIR=services_dir)
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "stop"], env=env, check=False)


class Watcher:
    def __init__(self, port):
        self.port = port
        self.arrivals = {}  # seq -> first arrival (time.time())
        self.ws = None

    async def run(self, job_id, cookie, ready):
        from tests.scaleout.wsclient import Closed, WebSocket

        self.ws = await WebSocket.connect(
            "127.0.0.1", self.port, f"/ws/jobs/{job_id}/", cookies=cookie, timeout=60
        )
        await self.ws.recv()  # the snapshot
        ready.set_result(True)
        try:
            while True:
                text = await self.ws.recv()
                now = time.time()
                for match in SEQ.finditer(text):
                    self.arrivals.setdefault(int(match.group(1)), now)
        except Closed:
            return


async def scenario(daphnes, job_id, cookie, watchers, seconds, hz, data_dir, other_pids):
    loop = asyncio.get_running_loop()
    clients = [Watcher(daphnes[i % len(daphnes)][1]) for i in range(watchers)]
    readies = [loop.create_future() for _ in clients]
    tasks = []
    t_connect = time.monotonic()
    for i in range(0, watchers, 50):  # connect in batches (listen backlog)
        batch = range(i, min(i + 50, watchers))
        tasks += [asyncio.create_task(clients[j].run(job_id, cookie, readies[j])) for j in batch]
        await asyncio.wait_for(asyncio.gather(*(readies[j] for j in batch)), 120)
    connect_seconds = time.monotonic() - t_connect
    await asyncio.sleep(2.0)  # every hub has joined the job's Redis group
    pids = {f"daphne-{n}": proc.pid for n, (proc, _port) in enumerate(daphnes, 1)} | other_pids
    cpu0, wall0 = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        PY, __file__, "--writer", str(job_id), "--seconds", str(seconds), "--hz", str(hz),
        "--data-dir", data_dir, stdout=asyncio.subprocess.PIPE, env=os.environ.copy(),
    )  # fmt: skip
    commits = {}
    while line := await proc.stdout.readline():
        seq, at = line.split()
        commits[int(seq)] = float(at)
    await proc.wait()
    await asyncio.sleep(1.0)
    wall = time.monotonic() - wall0
    cpu = {k: (cpu_seconds(p) - cpu0[k]) / wall * 100 for k, p in pids.items()}
    for c in clients:
        await c.ws.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    per_port = {}
    latencies, missed = [], 0
    for c in clients:
        for seq, at in commits.items():
            if seq in c.arrivals:
                ms = (c.arrivals[seq] - at) * 1000
                latencies.append(ms)
                per_port.setdefault(c.port, []).append(ms)
            else:
                missed += 1
    return {
        "watchers": watchers,
        "connect_s": connect_seconds,
        "writes": len(commits),
        "deliveries": len(latencies),
        "missed": missed,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies) if latencies else float("nan"),
        "mean": statistics.fmean(latencies) if latencies else float("nan"),
        "per_port": {port: (percentile(v, 50), percentile(v, 95), len(v)) for port, v in per_port.items()},
        "cpu": cpu,
    }


def prepare():
    """The latency benchmark's job and session, with the cookie as a dict."""
    job, session = _prepare()
    return job, {"sessionid": session}


def server_pid(port):
    """PID of the process listening on 127.0.0.1:port (for Redis/PostgreSQL CPU)."""
    inode = None
    for table in ("/proc/net/tcp",):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
                inode = parts[9]
    if inode is None:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[500])
    parser.add_argument("--daphnes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--hz", type=float, default=4)
    parser.add_argument("--writer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.data_dir, args.writer, args.seconds, args.hz)
        return
    services_dir = None
    if not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
        services_dir = start_services()
    data_dir = tempfile.mkdtemp(prefix="kvmweb-bench-watchers-")
    daphnes, logs = [], []
    try:
        setup_django(data_dir)
        from urllib.parse import urlparse

        from migrations_app import streaming

        job, cookie = prepare()
        for n in range(args.daphnes):
            port = free_port()
            log = open(Path(data_dir) / f"daphne-{n + 1}.log", "wb")  # noqa: SIM115
            logs.append(log)
            proc = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "daphne"), "-b", "127.0.0.1", "-p", str(port), "kvmweb.asgi:application"],
                cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            daphnes.append((proc, port))
        for proc, port in daphnes:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"daphne did not start; see {data_dir}") from None
                    time.sleep(0.1)
        others = {"clients": os.getpid()}  # the 500 sockets' own process, to see who saturates
        redis_pid = server_pid(urlparse(os.environ["REDIS_URL"]).port)
        if redis_pid:
            others["redis"] = redis_pid
        print(
            f"scale-out watchers: {args.daphnes} daphne processes, PostgreSQL + Redis; writer {args.hz:g}/s "
            f"for {args.seconds:g} s; poll interval with a layer {streaming.POLL_INTERVAL_WITH_LAYER * 1000:.0f} ms; "
            f"{os.cpu_count()} CPUs shared by everything (clients included)"
        )
        for n in args.watchers:
            r = asyncio.run(scenario(daphnes, job.pk, cookie, n, args.seconds, args.hz, data_dir, others))
            print(
                f"watchers {r['watchers']}: connected in {r['connect_s']:.1f} s; writes {r['writes']}, "
                f"deliveries {r['deliveries']}, coalesced {r['missed']}; latency p50 {r['p50']:.1f} ms, "
                f"p95 {r['p95']:.1f} ms, max {r['max']:.1f} ms"
            )
            for port, (p50, p95, count) in sorted(r["per_port"].items()):
                print(f"  daphne :{port}: {count} deliveries, p50 {p50:.1f} ms, p95 {p95:.1f} ms")
            print(
                "  CPU (% of one core while the writer ran): "
                + ", ".join(f"{k} {v:.1f}%" for k, v in r["cpu"].items())
            )
    finally:
        for proc, _port in daphnes:
            proc.terminate()
        for proc, _port in daphnes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
        if services_dir:
            stop_services(services_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

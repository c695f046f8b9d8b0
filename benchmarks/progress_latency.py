#!/usr/bin/env python3
"""Progress latency benchmark: from the worker's progress write to its arrival in a
WebSocket client, with 1 and with 200 watchers of one job, against a real daphne process.

A writer process does what the migration worker does four times a second: update the
job row (progress fields, progress_seq + 1) plus a ProgressSample in one transaction,
note the commit time, call publish_job(). The watchers are raw WebSocket clients on
loopback, signed in with a real session; each notes when the payload carrying that
progress_seq arrives. Latency = arrival - commit (one clock: everything runs on this
machine). A write a watcher never saw as its own message (coalesced into a later one: the
poller sends the newest state) counts at the arrival of the first newer state, when the
browser first shows that state or a newer one; "never" counts writes of which the watcher
showed neither. Also prints daphne's CPU use while the writer ran. By default two
CPU-bound processes run beside the server (--burners), as on a busy management host.

Embedded default (SQLite file, in-memory channel layer, the DB poller) unless
DATABASE_URL and REDIS_URL are set (then: PostgreSQL + channels-redis, e.g. after
`eval "$(bash scripts/services.sh start)"`; the tables are created there by migrate).

Run: .venv/bin/python benchmarks/progress_latency.py [--watchers 1 200 1000] [--seconds 20] [--hz 4]
[--at-once] (every watcher connects in the same instant; the "conn" column counts who got in)
Uses a throwaway data dir; starts daphne and the writer itself and stops them by PID.
"""

import argparse
import asyncio
import base64
import json
import os
import re
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
SEQ = re.compile(rb'data-seq="(\d+)"')


def setup_django(data_dir):
    os.environ["KVMWEB_DATA_DIR"] = data_dir
    os.environ["KVMWEB_ALLOWED_HOSTS"] = "127.0.0.1,testserver"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
    import django

    django.setup()


# ------------------------------------------------------------------ the writer (worker)


def writer(data_dir, job_id, seconds, hz):
    """Child process: progress writes like the worker's, one line 'seq commit_time' each."""
    setup_django(data_dir)
    from django.db import transaction
    from django.db.models import F
    from django.utils import timezone

    from migrations_app.models import MigrationJob, ProgressSample
    from migrations_app.streaming import publish_job

    job = MigrationJob.objects.get(pk=job_id)
    total = 4 << 30
    count = int(seconds * hz)
    next_at = time.monotonic()
    for i in range(count):
        next_at += 1 / hz
        remaining = total - (i + 1) * total // (count + 1)
        with transaction.atomic():
            MigrationJob.objects.filter(pk=job_id).update(
                phase="memory",
                percent=100 * (total - remaining) / total,
                data_total=total,
                data_processed=total - remaining,
                data_remaining=remaining,
                memory_total=total,
                memory_processed=total - remaining,
                memory_remaining=remaining,
                rate=300 << 20,
                dirty_rate=20 << 20,
                iteration=1 + i // 20,
                eta_seconds=remaining / (300 << 20),
                progress_at=timezone.now(),
                heartbeat_at=timezone.now(),
                progress_seq=F("progress_seq") + 1,
            )
            ProgressSample.objects.create(
                job=job, t=(i + 1) / hz, rate=300 << 20, remaining=remaining, processed=total - remaining
            )
            seq = MigrationJob.objects.filter(pk=job_id).values_list("progress_seq", flat=True).get()
        committed = time.time()
        publish_job(job_id)
        print(seq, f"{committed:.6f}", flush=True)
        time.sleep(max(0.0, next_at - time.monotonic()))
    time.sleep(0.5)  # let the publisher thread flush the last message


# ------------------------------------------------------------------ a minimal ws client


class Watcher(asyncio.Protocol):
    """A bare RFC 6455 client (text frames, ping/pong) on asyncio's protocol callbacks:
    cheap enough that 1,000 of them in one process measure the server, not the client.
    An arrival is timed when its bytes reach the client (data_received), before parsing."""

    def __init__(self, port, path, cookie):
        self.port, self.path, self.cookie = port, path, cookie
        self.arrivals = {}  # seq -> first arrival (time.time())
        self.messages = 0
        self.first_at = None  # arrival of the first message (the snapshot)
        self.first = None  # future set at the first message, once run() waits for it
        self.buf = bytearray()
        self.transport = None
        self.handshake = self.closed = None

    async def connect(self):
        loop = asyncio.get_running_loop()
        self.handshake, self.closed = loop.create_future(), loop.create_future()
        await loop.create_connection(lambda: self, "127.0.0.1", self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: http://127.0.0.1:{self.port}\r\nCookie: sessionid={self.cookie}\r\n\r\n"
            ).encode()
        )
        await self.handshake

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data):
        now = time.time()
        self.buf += data
        if not self.handshake.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[: self.buf.find(b"\r\n")])
            del self.buf[: end + 4]
            if b" 101 " not in status:
                self.handshake.set_exception(RuntimeError(f"handshake refused: {status!r}"))
                self.transport.close()
                return
            self.handshake.set_result(None)
        self._frames(now)

    def _frames(self, now):
        buf = self.buf
        while len(buf) >= 2:
            opcode, length, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, pos = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + length:
                return
            payload = bytes(buf[pos : pos + length])
            del buf[: pos + length]
            if opcode == 0x8:  # close
                self.transport.close()
                return
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            self.messages += 1
            if self.messages == 1:
                self.first_at = now
                if self.first is not None and not self.first.done():
                    self.first.set_result(now)
            for match in SEQ.finditer(payload):
                self.arrivals.setdefault(int(match.group(1)), now)

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    async def run(self, first_message):
        self.first = first_message
        if self.first_at is not None and not first_message.done():
            first_message.set_result(self.first_at)
        await self.closed

    def close(self):
        try:
            self._send(0x8, b"\x03\xe8")
            self.transport.close()
        except Exception:
            pass


# ------------------------------------------------------------------ the run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def scenario(port, job_id, cookie, watchers, seconds, hz, data_dir, daphne_pid, at_once=False):
    clients = [Watcher(port, f"/ws/jobs/{job_id}/", cookie) for _ in range(watchers)]
    firsts = [asyncio.get_running_loop().create_future() for _ in clients]
    tasks = []
    refused = {}
    hs_cpu0, hs_wall0 = cpu_seconds(daphne_pid), time.monotonic()
    if at_once:
        # Every watcher in the same instant (a daphne restart: every open job page
        # reconnects): count those whose handshake fails instead of failing the row.
        outcomes = await asyncio.gather(*(c.connect() for c in clients), return_exceptions=True)
        kept = []
        for c, f, out in zip(clients, firsts, outcomes, strict=True):
            if isinstance(out, BaseException):
                reason = str(out)[:60] or type(out).__name__
                refused[reason] = refused.get(reason, 0) + 1
            else:
                kept.append((c, f))
        clients, firsts = [c for c, _f in kept], [f for _c, f in kept]
        tasks = [asyncio.create_task(c.run(f)) for c, f in kept]
        done, _pending = await asyncio.wait(firsts, timeout=120) if firsts else (set(), set())
        if len(done) < len(firsts):
            refused["no snapshot within 120 s"] = len(firsts) - len(done)
    for i in range(0, watchers if not at_once else 0, 25):
        # Browsers arrive in groups of 25; the next group once these have their snapshot
        # (200 handshakes in the same instant would measure daphne's handshake timeout).
        batch = slice(i, i + 25)
        await asyncio.gather(*(c.connect() for c in clients[batch]))
        tasks += [asyncio.create_task(c.run(f)) for c, f in zip(clients[batch], firsts[batch], strict=True)]
        await asyncio.wait_for(asyncio.gather(*firsts[batch]), 60)
    # daphne's CPU per connected watcher (handshake, session lookup, snapshot) and how
    # long everyone took to connect.
    hs_cpu = (cpu_seconds(daphne_pid) - hs_cpu0) / max(1, len(clients))
    hs_wall = time.monotonic() - hs_wall0
    await asyncio.sleep(1.0)
    cpu0, wall0, client0 = cpu_seconds(daphne_pid), time.monotonic(), time.process_time()
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
    cpu = (cpu_seconds(daphne_pid) - cpu0) / (time.monotonic() - wall0)
    client_cpu = (time.process_time() - client0) / (time.monotonic() - wall0)
    for c in clients:
        c.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Every write counts, at the time the watcher first shows that state or a newer one:
    # a write coalesced into a later message is shown when that later message arrives.
    latencies, coalesced, never, starved = [], 0, 0, 0
    for c in clients:
        shown = {}  # seq -> first arrival of that seq or a newer one
        earliest = float("inf")
        for seq in sorted(c.arrivals, reverse=True):
            earliest = min(earliest, c.arrivals[seq])
            shown[seq] = earliest
        newer = sorted(shown)
        got = 0
        for seq, at in commits.items():
            if seq in c.arrivals:
                latencies.append((c.arrivals[seq] - at) * 1000)
                got += 1
                continue
            later = [s for s in newer if s > seq]
            if later:
                coalesced += 1
                latencies.append((shown[later[0]] - at) * 1000)
            else:
                never += 1  # the watcher never showed this state nor a newer one
        starved += not got
    if starved:
        print(f"  {starved} watcher(s) received none of the writes as their own message", file=sys.stderr)
    if refused:
        print(f"  not connected: {refused}", file=sys.stderr)
    return {
        "watchers": watchers,
        "connected": len(clients),
        "writes": len(commits),
        "deliveries": len(latencies),
        "coalesced": coalesced,
        "never": never,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies) if latencies else float("nan"),
        "mean": statistics.fmean(latencies) if latencies else float("nan"),
        "cpu": cpu * 100,
        "client_cpu": client_cpu * 100,
        "handshake_cpu_ms": hs_cpu * 1000,
        "connect_s": hs_wall,
    }


def start_burners(n):
    """``n`` CPU-bound processes beside the server, as on a busy management host."""
    code = "while True:\n    pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def prepare():
    """A user, two hosts, a VM and a running job in a fresh database; a session cookie."""
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.test import Client
    from django.utils import timezone

    from hosts.models import VM, Host
    from kvmweb.accounts.roles import OPERATOR
    from migrations_app.models import MigrationJob

    call_command("migrate", verbosity=0)
    suffix = os.urandom(3).hex()
    user = User.objects.create_user(f"bench-{suffix}", password="x" * 20)
    user.groups.add(Group.objects.get(name=OPERATOR))
    src = Host.objects.create(name=f"bench-src-{suffix}", uri=f"test:///bench-src-{suffix}")
    dst = Host.objects.create(name=f"bench-dst-{suffix}", uri=f"test:///bench-dst-{suffix}")
    import uuid

    vm = VM.objects.create(uuid=uuid.uuid4(), name=f"bench-{suffix}", host=src, owner_user=user)
    job = MigrationJob.objects.create(
        vm=vm, vm_name=vm.name, source=src, source_name=src.name, target=dst, target_name=dst.name,
        mode=MigrationJob.LIVE, status=MigrationJob.RUNNING, started_at=timezone.now(), phase="setup",
    )  # fmt: skip
    client = Client()
    client.force_login(user)
    return job, client.cookies["sessionid"].value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--hz", type=float, default=4)
    parser.add_argument("--burners", type=int, default=2, help="CPU-bound processes run beside the server")
    parser.add_argument(
        "--at-once",
        action="store_true",
        help="every watcher connects in the same instant (not in groups of 25)",
    )
    parser.add_argument("--writer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.data_dir, args.writer, args.seconds, args.hz)
        return
    data_dir = tempfile.mkdtemp(prefix="kvmweb-bench-progress-")
    setup_django(data_dir)
    from django.conf import settings

    scaleout = bool(os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"))
    job, cookie = prepare()
    port = free_port()
    log = open(Path(data_dir) / "daphne.log", "wb")
    daphne = subprocess.Popen(
        # As scripts/run.sh serves it (kvmweb.serve: daphne with kvmweb's limits and backlog).
        [PY, "-m", "kvmweb.serve", "-b", "127.0.0.1", "-p", str(port), "kvmweb.asgi:application"],
        cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    burners = []
    results = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or daphne.poll() is not None:
                    raise SystemExit(f"daphne did not start; see {log.name}") from None
                time.sleep(0.1)
        mode = "scale-out: PostgreSQL + channels-redis" if scaleout else "embedded: SQLite + DB poller"
        from migrations_app import streaming

        print(f"progress latency, {mode}; poll interval {streaming.POLL_INTERVAL * 1000:.0f} ms", end="")
        print(f" ({streaming.POLL_INTERVAL_WITH_LAYER * 1000:.0f} ms with a layer)" if scaleout else "")
        print(f"writer: {args.hz:g} progress writes/s for {args.seconds:g} s; daphne pid {daphne.pid}")
        print(f"database: {settings.DATABASES['default']['NAME']}")
        burners = start_burners(args.burners)
        print(f"{args.burners} CPU-bound process(es) running beside the server")
        print("latency counts every write at the first arrival of that state or a newer one")
        print(f"{'watchers':>8} {'conn':>5} {'writes':>6} {'counted':>7} {'coalesced':>9} {'never':>5} "
              f"{'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'daphne CPU':>10} {'client CPU':>10} "
              f"{'connect s':>9} {'CPU/handshake':>13}")  # fmt: skip
        for n in args.watchers:
            try:
                r = asyncio.run(
                    scenario(
                        port, job.pk, cookie, n, args.seconds, args.hz, data_dir, daphne.pid, args.at_once
                    )
                )
            except Exception as exc:  # report the other rows
                print(f"{n:>8} FAILED: {exc!r}", flush=True)
                results.append({"watchers": n, "error": repr(exc)})
                continue
            flag = "  NOTHING DELIVERED" if not r["deliveries"] else ""
            print(
                f"{r['watchers']:>8} {r['connected']:>5} {r['writes']:>6} {r['deliveries']:>7} {r['coalesced']:>9} {r['never']:>5} "
                f"{r['p50']:>7.1f} {r['p95']:>7.1f} {r['max']:>7.1f} {r['cpu']:>9.1f}% {r['client_cpu']:>9.1f}% "
                f"{r['connect_s']:>9.1f} {r['handshake_cpu_ms']:>10.1f} ms{flag}",
                flush=True,
            )
            results.append({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()})
    finally:
        for b in burners:
            b.kill()
            b.wait(10)
        daphne.terminate()
        try:
            daphne.wait(10)
        except subprocess.TimeoutExpired:
            daphne.kill()
        log.close()
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(json.dumps({"burners": args.burners, "load": round(load[0], 2), "rows": results}))


if __name__ == "__main__":
    main()

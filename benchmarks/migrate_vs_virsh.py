#!/usr/bin/env python3
"""kvmweb's migration job against plain `virsh migrate`, same lab VM, same bandwidth cap.

For each pair, one live migration through kvmweb and one with
`virsh migrate --live --p2p --persistent --undefinesource --bandwidth N`, the VM going back
and forth between lab-a and lab-b; the order inside a pair alternates. kvmweb's time runs
from submission (the wizard's confirm: do_create_job, which runs the checklist again)
to the job row recorded as succeeded, through the real path: on_commit enqueue, a real
`Q_CLUSTER_NAME=migrations manage.py qcluster` worker, the worker's claim and preflight,
the migration with progress polling, completed stats, inventory sync of both hosts,
audit. virsh's time is the wall time of the virsh process.

Prints every run, the median per side, and the median of the per-pair ratios
(kvmweb / virsh), plus where kvmweb's extra time goes (queue pickup, worker preflight,
conclusion). Goal: median ratio <= 1.05.

Run as root with the lab available: .venv/bin/python benchmarks/migrate_vs_virsh.py
[--pairs 6] [--bandwidth 16] [--memory 128]; --bandwidth 0 runs both sides uncapped (no
--bandwidth flag, no bandwidth option).
Uses a throwaway SQLite database and data dir; creates and removes its own guest.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labbench  # noqa: E402

TMP = labbench.setup("kvmweb-bench-migrate-")
ROOT = labbench.ROOT

import lab  # noqa: E402
from hosts import services as host_services  # noqa: E402
from hosts.models import VM, Host  # noqa: E402
from migrations_app.models import MigrationJob  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402
from migrations_app.preflight import run_preflight  # noqa: E402
from migrations_app.services import do_create_job  # noqa: E402


def run_kvmweb(user, name, target, bandwidth):
    vm = VM.objects.get(name=name, gone=False)
    options = {"bandwidth": bandwidth} if bandwidth else {}
    plan = MigrationPlan(vm, vm.host, target, "live", dict(options))
    report = run_preflight(plan)  # the wizard's step 4 (not timed: the user reads it)
    acks = [r.id for r in report.warnings]
    t0 = time.monotonic()
    # The confirm POST: the wizard hands over the report the user just read (views._seen_report).
    job = do_create_job(vm, target, "live", dict(options), actor=user, report=report, acknowledged=acks)
    while True:
        status = MigrationJob.objects.filter(pk=job.pk).values_list("status", flat=True).get()
        if status not in MigrationJob.ACTIVE_STATES:
            break
        time.sleep(0.005)
    wall = time.monotonic() - t0
    job.refresh_from_db()
    if job.status != MigrationJob.SUCCEEDED:
        raise SystemExit(f"kvmweb job #{job.pk} ended {job.status}: {job.error}")
    events = {e.message.split(":")[0].split(" (")[0]: e.at for e in job.events.all()}
    pickup = (job.started_at - job.created_at).total_seconds()
    started = next((at for msg, at in events.items() if msg.startswith("Migration started")), None)
    preflight = (started - job.started_at).total_seconds() if started else None
    migration = (job.elapsed_ms or 0) / 1000
    timing = job.result.get("timing_ms", {})
    detail = {"pickup": pickup, "worker_preflight": preflight, "libvirt_elapsed": migration, "job": job.pk}
    detail["claim_to_call"] = timing.get("migrate_start", 0) / 1000
    detail["conclude"] = (timing.get("concluded", 0) - timing.get("migrate_end", 0)) / 1000
    detail["migrate_call"] = (timing.get("migrate_end", 0) - timing.get("migrate_start", 0)) / 1000
    detail["after_call"] = wall - pickup - timing.get("migrate_end", 0) / 1000
    return wall, detail


def run_cli(user, name, target, bandwidth, extra=()):
    """`manage.py migrate_vm NAME TARGET --mode live --bandwidth N --ack-all --wait`: the wall
    time of the process, start to exit (Django start-up, checklist, job, queue, worker,
    conclusion, exit), as a user of the command waits for it."""
    cmd = [sys.executable, "manage.py", "migrate_vm", name, target.name, "--mode", "live"]
    cmd += ["--bandwidth", str(bandwidth)] if bandwidth else []
    cmd += ["--user", user.username, "--ack-all", "--wait", *extra]
    env = dict(os.environ, KVMWEB_CLI_TIMING=repr(time.time()))
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"migrate_vm failed ({r.returncode}): {r.stdout.strip()} {r.stderr.strip()}")
    times = {}
    for line in r.stderr.splitlines():  # KVMWEB_CLI_TIMING: "timing <label> <seconds since start>"
        if line.startswith("timing "):
            _t, label, at = line.split()
            times[label] = float(at)
    return wall, times


def run_virsh(name, source, target, bandwidth):
    return labbench.virsh_migrate(name, source, target, bandwidth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--bandwidth", type=int, default=16)
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="3 rounds (about 2 minutes)")
    ap.add_argument(
        "--cli-quick", action="store_true", help="run migrate_vm with --quick (no dirty-rate measurement)"
    )
    ap.add_argument("--no-job", action="store_true", help="leave out the in-process job side")
    args = ap.parse_args()
    if args.quick:
        args.pairs = min(args.pairs, 3)

    started = lab.up(2)
    user, hosts = labbench.kvmweb(("lab-a", "lab-b"))
    name = f"bench-mig-{secrets.token_hex(3)}"
    lab.create_guest(name, host="lab-a", storage="shared", memory_mib=args.memory)
    lab.wait_counter_moves("lab-a", name)
    worker = labbench.start_worker()
    where = "lab-a"
    rows = []
    failures = 0
    try:
        for h in hosts.values():
            host_services.do_sync_inventory(h)
        sides = ["virsh", "cli"] + ([] if args.no_job else ["kvmweb"])
        for i in range(args.pairs):
            order = sides[i % len(sides) :] + sides[: i % len(sides)]  # rotate who goes first
            pair = {}
            for side in order:
                other = "lab-b" if where == "lab-a" else "lab-a"
                try:
                    if side == "kvmweb":
                        pair["kvmweb"], pair["detail"] = run_kvmweb(
                            user, name, Host.objects.get(name=other), args.bandwidth
                        )
                    elif side == "cli":
                        pair["cli"], pair["cli_times"] = run_cli(
                            user,
                            name,
                            Host.objects.get(name=other),
                            args.bandwidth,
                            ("--quick",) if args.cli_quick else (),
                        )
                    else:
                        pair["virsh"] = run_virsh(name, where, other, args.bandwidth)
                        for h in hosts.values():  # kvmweb must learn where virsh put it (not timed)
                            host_services.do_sync_inventory(h)
                except SystemExit as exc:  # report what the other rounds measured
                    print(f"round {i + 1} {side}: FAILED {exc}", flush=True)
                    failures += 1
                    for h in hosts.values():
                        host_services.do_sync_inventory(h)
                    where = VM.objects.get(name=name, gone=False).host.name
                    continue
                where = other
                lab.wait_counter_moves(where, name)
            if "virsh" not in pair:
                continue
            for side in ("kvmweb", "cli"):
                if side in pair:
                    pair[f"ratio_{side}"] = pair[side] / pair["virsh"]
            rows.append(pair)
            line = f"round {i + 1}: virsh {pair['virsh']:.3f} s"
            if "cli" in pair:
                t = pair["cli_times"]
                line += f"  cli {pair['cli']:.3f} s (ratio {pair['ratio_cli']:.3f}"
                line += "".join(f", {k} {v:.2f}" for k, v in t.items()) + ")"
            if "kvmweb" in pair:
                d = pair["detail"]
                line += (
                    f"  job {pair['kvmweb']:.3f} s (ratio {pair['ratio_kvmweb']:.3f}; pickup {d['pickup'] * 1000:.0f} ms,"
                    f" claim to call {d['claim_to_call'] * 1000:.0f} ms, migrate call {d['migrate_call']:.3f} s,"
                    f" call end to recorded {d['after_call'] * 1000:.0f} ms)"
                )
            print(line, flush=True)
    finally:
        labbench.stop_worker(worker)
        lab.remove_guest(name)
        if started:
            lab.down(hosts=started)
    med = statistics.median
    load = os.getloadavg()
    print()
    cap = f"--bandwidth {args.bandwidth} MiB/s" if args.bandwidth else "uncapped"
    print(f"live p2p, {args.memory} MiB guest, {cap}, {len(rows)} rounds")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; failed runs {failures}")
    summary = {"bandwidth": args.bandwidth, "rounds": len(rows), "failures": failures, "load": load[0]}
    summary["ratio"] = {}
    if not rows:
        print("NOTHING COMPLETED")
    else:
        summary["virsh_s"] = round(med(r["virsh"] for r in rows), 3)
        print(f"virsh median {summary['virsh_s']:.3f} s")
        for side, label in (("cli", "migrate_vm --wait process"), ("kvmweb", "job created to recorded")):
            got = [r for r in rows if side in r]
            if not got:
                continue
            ratios = [r[f"ratio_{side}"] for r in got]
            summary[f"{side}_s"] = round(med(r[side] for r in got), 3)
            summary["ratio"][side] = round(med(ratios), 3)
            print(
                f"{label}: median {summary[f'{side}_s']:.3f} s, median ratio to virsh {med(ratios):.3f}"
                f" (min {min(ratios):.3f}, max {max(ratios):.3f}; goal <= 1.10)"
            )
        cli = [r["cli_times"] for r in rows if r.get("cli_times")]
        if cli:
            parts = sorted({k for t in cli for k in t}, key=lambda k: med(t[k] for t in cli if k in t))
            print(
                "cli timeline (median s since process start): "
                + ", ".join(f"{k} {med(t[k] for t in cli if k in t):.2f}" for k in parts)
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How far the preflight's prediction is from what live migrations really take, on the lab.

Guests of two sizes (memory and data: --sizes MEMORY:FILL, MiB) go back and forth between
lab-a and lab-b through kvmweb jobs run by a real migrations worker (the helpers of
benchmarks/migrate_vs_virsh.py), uncapped and at each --caps bandwidth, --runs times each.
Before every job the preflight predicts its duration and downtime (with the dirty-rate
measurement, as the wizard does); the job's figures are libvirt's completed-job statistics
(time_elapsed, downtime). Each guest first makes --warmup uncapped round trips, not counted:
they are what kvmweb learns the fixed costs and the link's rate from, as it would from a
host pair's earlier migrations.

Prints every run (predicted vs actual duration and downtime, error %), then the median
|error| of the duration (goal <= 20 %) and of the downtime, overall and per cap, and the
load average (the machine is shared: a loaded machine makes the fixed costs noisy).

Run as root with the lab available:
  .venv/bin/python benchmarks/prediction.py [--sizes 128:32,256:128] [--caps 0,32,64] [--runs 3]
Uses a throwaway SQLite database and data dir (set up by migrate_vs_virsh on import);
creates and removes its own guests.
"""

import argparse
import json
import os
import secrets
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Sets up the throwaway database and Django, and gives the worker and job helpers.
from labbench import start_worker, stop_worker  # noqa: E402
from migrate_vs_virsh import run_kvmweb  # noqa: E402

# isort: split
from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.management import call_command  # noqa: E402

import lab  # noqa: E402
from hosts import services as host_services  # noqa: E402
from hosts.models import VM, Host  # noqa: E402
from kvmweb.accounts.roles import OPERATOR  # noqa: E402
from migrations_app.models import MigrationJob  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402
from migrations_app.preflight import run_preflight  # noqa: E402


def predict(name, target, cap):
    """The preflight's estimate for this move: (seconds, downtime ms, details)."""
    vm = VM.objects.get(name=name, gone=False)
    plan = MigrationPlan(vm, vm.host, target, "live", {"bandwidth": cap})
    report = run_preflight(plan)
    details = next(r for r in report.results if r.id == "prediction").details
    return details.get("estimated_seconds"), details.get("estimated_downtime_ms"), details


def move(user, name, cap):
    """One job to the other host; returns the finished job."""
    vm = VM.objects.get(name=name, gone=False)
    target = Host.objects.exclude(pk=vm.host_id).get(name__in=("lab-a", "lab-b"))
    _wall, detail = run_kvmweb(user, name, target, cap)
    lab.wait_counter_moves(target.name, name)
    return MigrationJob.objects.get(pk=detail["job"]), target


def pct(predicted, actual):
    return 100.0 * (predicted - actual) / actual if predicted is not None and actual else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="128:32,256:128", help="MEMORY:FILL MiB per guest, comma-separated")
    ap.add_argument("--caps", default="0,32,64", help="bandwidth caps in MiB/s (0 = uncapped)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="uncapped round trips per guest, not counted")
    args = ap.parse_args()
    sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes.split(",")]
    caps = [int(c) or None for c in args.caps.split(",")]

    started = lab.up(2)
    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench-operator", password=secrets.token_hex(8))
    user.groups.add(Group.objects.get(name=OPERATOR))
    hosts = [host_services.do_register_host(h, lab.uri(h), sync=False) for h in ("lab-a", "lab-b")]
    guests = {}
    for memory, fill in sizes:
        name = f"bench-pred-{memory}-{secrets.token_hex(2)}"
        lab.create_guest(name, host="lab-a", storage="shared", memory_mib=memory, fill_mib=fill)
        lab.wait_counter_moves("lab-a", name)
        guests[name] = (memory, fill)
    worker = start_worker()
    rows = []
    try:
        for h in hosts:
            host_services.do_sync_inventory(h)
        for name in guests:
            for _ in range(2 * args.warmup):
                move(user, name, None)
        print("warm-up done", flush=True)
        for run in range(args.runs):
            for name, (memory, fill) in guests.items():
                for cap in caps:
                    vm = VM.objects.get(name=name, gone=False)
                    target = Host.objects.exclude(pk=vm.host_id).get(name__in=("lab-a", "lab-b"))
                    seconds, downtime, details = predict(name, target, cap)
                    job, _target = move(user, name, cap)
                    actual_s = (job.elapsed_ms or 0) / 1000
                    row = {
                        "run": run + 1,
                        "memory": memory,
                        "fill": fill,
                        "cap": cap or 0,
                        "direction": f"{vm.host.name}->{target.name}",
                        "pred_s": seconds,
                        "actual_s": actual_s,
                        "err_s": pct(seconds, actual_s),
                        "pred_down": downtime,
                        "actual_down": job.downtime_ms,
                        "err_down": pct(downtime, job.downtime_ms),
                        "fixed_s": details.get("fixed_seconds"),
                        "bw": details.get("bandwidth_mib_s"),
                        "to_send": details.get("memory_to_send_mib"),
                        "dirty": details.get("dirty_rate_mib_s"),
                    }
                    rows.append(row)
                    print(
                        f"run {row['run']} {memory:4d} MiB (fill {fill}) cap {cap or '-':>3} {row['direction']}: "
                        f"duration predicted {seconds} s, actual {actual_s:.2f} s ({row['err_s']:+.0f} %); "
                        f"downtime predicted {downtime} ms, actual {job.downtime_ms} ms "
                        f"[to send {row['to_send']} MiB at {row['bw']} MiB/s, dirty {row['dirty']} MiB/s, "
                        f"fixed {row['fixed_s']} s]",
                        flush=True,
                    )
    finally:
        stop_worker(worker)
        for name in guests:
            lab.remove_guest(name)
        if started:
            lab.down(hosts=started)
    med = statistics.median
    load = os.getloadavg()
    print()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {len(rows)} runs")
    summary = {"runs": len(rows), "load": round(load[0], 2), "per_cap": {}}
    timed = [r for r in rows if r["err_s"] is not None]
    if timed:
        summary["duration_median_abs_err_pct"] = round(med(abs(r["err_s"]) for r in timed), 1)
        within = sum(abs(r["err_s"]) <= 20 for r in timed)
        print(
            f"duration: median |error| {summary['duration_median_abs_err_pct']:.1f} % "
            f"(goal <= 20 %), {within} of {len(timed)} within +-20 %, "
            f"median signed error {med(r['err_s'] for r in timed):+.1f} %"
        )
    downs = [r for r in rows if r["err_down"] is not None]
    if downs:
        summary["downtime_median_abs_err_pct"] = round(med(abs(r["err_down"]) for r in downs), 1)
        print(
            f"downtime: median |error| {summary['downtime_median_abs_err_pct']:.1f} %, predicted "
            f"{min(r['pred_down'] for r in downs)}-{max(r['pred_down'] for r in downs)} ms, actual "
            f"{min(r['actual_down'] for r in downs)}-{max(r['actual_down'] for r in downs)} ms"
        )
    for cap in caps:
        some = [r for r in timed if r["cap"] == (cap or 0)]
        if some:
            summary["per_cap"][cap or 0] = round(med(abs(r["err_s"]) for r in some), 1)
            print(f"  cap {cap or 'none'}: duration median |error| {summary['per_cap'][cap or 0]:.1f} %")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

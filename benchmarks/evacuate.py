#!/usr/bin/env python3
"""Evacuating lab-a through kvmweb against hand-written `virsh migrate` loops.

N guests (shared storage, running) on lab-a go to lab-b and lab-c three ways, the guests
coming back to lab-a with virsh between rounds (not timed):
1. kvmweb: the planner's plan (full preflight per VM, not timed: the person reads it), then
   a batch with --max-parallel P and P per source, run by the real scheduler (in this
   process) and a real `Q_CLUSTER_NAME=migrations manage.py qcluster` worker; timed from
   the batch's start to its end (every child recorded as succeeded).
2. virsh, P in parallel: a thread pool of P running
   `virsh migrate --live --p2p --persistent --undefinesource [--bandwidth B]`, each guest
   to the target kvmweb chose for it.
3. virsh, one after another.
Prints the walls, kvmweb / parallel virsh (goal <= 1.15), the planner's predicted total
against kvmweb's actual wall, and each side's time beyond its migrations per lane (the
wall minus the sum of kvmweb's libvirt migrate calls, resp. of the virsh processes, over
the parallelism: the call alone varies round to round by more than kvmweb's own share);
ends with one JSON line of the medians. The scheduler is driven as
`manage.py evacuate --wait` drives it. ``--trace`` prints each child's timeline (row
created, claimed, checklist done, libvirt call start and end, concluded, final, in ms
from the batch's start) and the CPU each side used (this process: the scheduler's
passes; the worker's processes; the libvirt daemons; the virsh processes).

Only this benchmark's guests are planned (the lab is shared: other sessions' guests on
lab-a are left alone). Run as root with the lab available:
  .venv/bin/python benchmarks/evacuate.py [--guests 6] [--parallel 2] [--memory 128] [--bandwidth 32] [--trace]
Uses a throwaway SQLite database and data dir; creates and removes its own guests.
"""

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labbench  # noqa: E402

TMP = labbench.setup("kvmweb-bench-evacuate-")

import lab  # noqa: E402
from fleet import scheduler  # noqa: E402
from fleet.models import Batch, BatchItem  # noqa: E402
from fleet.planner import make_plan  # noqa: E402
from fleet.services import do_create_batch  # noqa: E402
from hosts import services as host_services  # noqa: E402
from hosts.models import VM, Host  # noqa: E402
from migrations_app.models import MigrationJob  # noqa: E402

HOSTS = ("lab-a", "lab-b", "lab-c")
virsh_migrate = labbench.virsh_migrate


def bring_back(placement):
    """Every guest back to lab-a (virsh, not timed), and kvmweb learns it."""
    for name in placement:
        where = lab.where(name)
        if "lab-a" not in where:
            virsh_migrate(name, next(iter(where)), "lab-a", 0)
    for name in placement:
        lab.wait_counter_moves("lab-a", name)
    host_services.do_sync_inventory(Host.objects.get(name="lab-a"))


def run_kvmweb(user, names, parallel, bandwidth, trace=False, worker=None):
    vms = list(VM.objects.filter(name__in=names, gone=False).select_related("host"))
    t0 = time.monotonic()
    plan = make_plan(
        vms,
        user,
        limits={"max_parallel": parallel, "per_source": parallel, "per_target": parallel},
        options={"bandwidth": bandwidth} if bandwidth else None,
    )
    planning = time.monotonic() - t0
    if plan.blocked:
        raise SystemExit(f"the planner left VMs behind: {[(r.vm.name, r.reasons) for r in plan.blocked]}")
    host = vms[0].host
    cpu = labbench.cpu_snapshot(worker)
    t0 = time.monotonic()
    batch = do_create_batch(plan, user, host=host)
    batch = scheduler.drive(batch.pk, timeout=900)  # as `manage.py evacuate --wait` drives it
    wall = time.monotonic() - t0
    cpu = labbench.cpu_delta(cpu, labbench.cpu_snapshot(worker))
    if batch.status != Batch.SUCCEEDED:
        raise SystemExit(
            f"batch #{batch.pk} ended {batch.status}: {list(batch.items.values('vm_name', 'status', 'reason'))}"
        )
    placement = dict(batch.items.filter(status=BatchItem.SUCCEEDED).values_list("vm_name", "target_name"))
    if trace:
        print_trace(batch)
        print(f"  cpu kvmweb (s): {cpu}", flush=True)
    return wall, planning, plan.total_seconds, placement, slot_gaps(batch), call_seconds(batch)


def print_trace(batch):
    """Each child's timeline in ms from the batch's start: row created, claimed, checklist
    done, libvirt call start and end, concluded (the job's own marks), final."""
    t0 = batch.started_at
    jobs = MigrationJob.objects.filter(batch_item__batch=batch).order_by("started_at")
    for job in jobs:
        marks = (job.result or {}).get("timing_ms", {})

        def at(when):
            return round((when - t0).total_seconds() * 1000) if when else None

        claimed = at(job.started_at)
        steps = " ".join(f"{name} {claimed + ms}" for name, ms in marks.items())
        print(
            f"  trace {job.vm_name:<22} {job.target_name}: created {at(job.created_at)} claimed {claimed} "
            f"{steps} final {at(job.finished_at)}",
            flush=True,
        )


def call_seconds(batch):
    """The sum of the children's libvirt migrate calls (their ``timing_ms``), in s."""
    total = 0
    for result in MigrationJob.objects.filter(batch_item__batch=batch).values_list("result", flat=True):
        t = (result or {}).get("timing_ms", {})
        total += t.get("migrate_end", 0) - t.get("migrate_start", 0)
    return total / 1000


def slot_gaps(batch):
    """Per child after the first wave: from the slot it took being freed (the latest
    child landing, or end, before its claim) to its claim (``started_at``), to its
    libvirt migrate call (the claim plus its ``migrate_start`` mark: the lane's whole
    hand-over), and to its row's creation (negative: created ahead, pipelined). Returns
    (mean claim gap, mean call gap, mean creation gap) in s."""
    jobs = sorted(
        MigrationJob.objects.filter(batch_item__batch=batch, started_at__isnull=False).values(
            "created_at", "started_at", "finished_at", "landed_at", "result"
        ),
        key=lambda j: j["started_at"],
    )
    claim, call, create = [], [], []
    for j in jobs:
        freed = [o["landed_at"] or o["finished_at"] for o in jobs]
        ended = [t for t in freed if t and t <= j["started_at"]]
        if ended:
            claim.append((j["started_at"] - max(ended)).total_seconds())
            create.append((j["created_at"] - max(ended)).total_seconds())
            started = ((j["result"] or {}).get("timing_ms") or {}).get("migrate_start")
            if started is not None:
                call.append(claim[-1] + started / 1000)
    mean = statistics.mean
    nan = float("nan")
    return (mean(claim) if claim else nan, mean(call) if call else nan, mean(create) if create else nan)


def run_virsh(placement, parallel, bandwidth, trace=False):
    """(wall, sum of the virsh processes' own walls) of a loop of ``parallel`` threads."""
    cpu = labbench.cpu_snapshot()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        each = list(
            pool.map(lambda item: virsh_migrate(item[0], "lab-a", item[1], bandwidth), placement.items())
        )
    wall = time.monotonic() - t0
    if trace:
        print(f"  cpu virsh x{parallel} (s): {labbench.cpu_delta(cpu, labbench.cpu_snapshot())}", flush=True)
    return wall, sum(each)


def run_rounds(args):
    """Set up the guests and a worker, run the rounds, clean up. Returns the rounds' figures."""
    user, _hosts = labbench.kvmweb(HOSTS)
    names = [f"bench-ev-{i}-{secrets.token_hex(3)}" for i in range(args.guests)]
    worker = None
    results = []
    try:
        for name in names:
            lab.create_guest(name, host="lab-a", storage="shared", memory_mib=args.memory)
        for name in names:
            lab.wait_counter_moves("lab-a", name)
        host_services.do_sync_inventory(Host.objects.get(name="lab-a"))
        worker = labbench.start_worker()
        for i in range(args.rounds):
            kvm, planning, predicted, placement, gaps, calls = run_kvmweb(
                user, names, args.parallel, args.bandwidth, trace=args.trace, worker=worker
            )
            bring_back(placement)
            par, processes = run_virsh(placement, args.parallel, args.bandwidth, trace=args.trace)
            bring_back(placement)
            seq, _each = run_virsh(placement, 1, args.bandwidth)
            bring_back(placement)
            # Each side's time beyond its migrations, per lane: the wall minus the sum of
            # kvmweb's migrate calls (of the virsh processes) over the parallelism. The
            # migrate call alone varies round to round by more than kvmweb's own share.
            own = (kvm - calls / args.parallel, par - processes / args.parallel)
            results.append((kvm, par, seq, predicted, planning, own, gaps))
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(
                f"round {i + 1} (load average {load}): kvmweb {kvm:.2f} s (predicted {predicted:.1f} s; planning {planning:.1f} s)  "
                f"virsh x{args.parallel} {par:.2f} s  virsh sequential {seq:.2f} s  "
                f"ratio kvmweb/virsh-parallel {kvm / par:.3f}  "
                f"slot freed -> next child claimed {gaps[0]:.3f} s, its migrate call {gaps[1]:.3f} s "
                f"(its row created {gaps[2]:+.3f} s)  "
                f"beyond the migrations: kvmweb {own[0]:.2f} s, virsh {own[1]:.2f} s",
                flush=True,
            )
    finally:
        labbench.stop_worker(worker)
        for name in names:
            lab.remove_guest(name)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--guests", type=int, default=6)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--bandwidth", type=int, default=32, help="MiB/s cap per migration (0: none)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trace", action="store_true", help="print each child's timeline")
    args = ap.parse_args()

    # lab.session: hosts this run had to start (lab-c) are stopped at the end only when no
    # other session holds a lease and no guest runs on them (stopping lab-c outright killed
    # other sessions' migrations to it).
    with lab.session(3):
        results = run_rounds(args)
    best = min(results, key=lambda r: r[0] / r[1])
    worst = max(results, key=lambda r: r[0] / r[1])
    print()
    print(
        f"{args.guests} guests of {args.memory} MiB, live, bandwidth {args.bandwidth or 'unlimited'} MiB/s, "
        f"{args.parallel} in parallel, {len(results)} rounds"
    )
    for label, r in (("best", best), ("worst", worst)):
        print(
            f"{label}: kvmweb {r[0]:.2f} s, virsh parallel {r[1]:.2f} s (ratio {r[0] / r[1]:.3f}; goal <= 1.15), "
            f"virsh sequential {r[2]:.2f} s, predicted {r[3]:.1f} s (actual / predicted {r[0] / r[3]:.2f})"
        )
    ratios = [r[0] / r[1] for r in results]
    print(f"median ratio kvmweb / virsh parallel {statistics.median(ratios):.3f} over {len(ratios)} rounds")
    kvm_own, virsh_own = (statistics.median(r[5][i] for r in results) for i in (0, 1))
    print(
        f"time beyond the migrate calls per lane (median): kvmweb {kvm_own:.2f} s, virsh {virsh_own:.2f} s "
        f"(wall minus the sum of the calls, resp. of the virsh processes, over the parallelism)"
    )
    handover = statistics.median(r[6][1] for r in results)
    print(f"slot freed -> next child's migrate call (median of the rounds' means): {handover:.3f} s")
    print(
        json.dumps(
            {
                "ratio": round(statistics.median(ratios), 3),
                "handover_s": round(handover, 3),
                "kvmweb_s": round(statistics.median(r[0] for r in results), 2),
                "virsh_parallel_s": round(statistics.median(r[1] for r in results), 2),
                "own_s": {"kvmweb": round(kvm_own, 2), "virsh": round(virsh_own, 2)},
                "load": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

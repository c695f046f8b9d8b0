#!/usr/bin/env python3
"""Preflight benchmark: the full checklist (18 checks) for one running lab VM, lab-a ->
lab-b, Live mode, against the real libvirt daemons of the KVM lab.

Prints median / p95 / max over N runs (default 20) for:
  * full (fresh): every run measures the dirty rate anew (libvirt's measurement takes
    a whole second by itself: QEMU's calc-time is in whole seconds);
  * full (reused dirty rate): the default in the web app, where a measurement younger
    than KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE (60 s) is reused (the wizard's re-run);
  * full (stored dirty rate, another process): the in-process reuse emptied before each
    run, as in a fresh `manage.py migrate_vm` / `preflight` process or another daphne: the
    measurement comes from the database (migrations_app/dirtyrate.py);
  * quick (no dirty-rate measurement): what the wizard uses to rank targets;
  * sequential: the same checks one after another (concurrency off), for comparison;
and, for scale, `virsh domstate` on the same VM (one process start and one call).

Run (root, the lab is started if needed and torn down if this script started it):
    .venv/bin/python benchmarks/preflight.py [--runs 20]
Uses a throwaway SQLite database under a temp dir.
"""

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="kvmweb-bench-"))
os.environ["KVMWEB_DATA_DIR"] = str(TMP)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")

import django  # noqa: E402
import labbench  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

import lab  # noqa: E402
from hosts import hypervisor, services  # noqa: E402
from hosts.models import VM  # noqa: E402
from migrations_app import preflight  # noqa: E402
from migrations_app.models import DirtyRateSample  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402
from migrations_app.preflight import run as preflight_run  # noqa: E402
from migrations_app.preflight.checks import prediction  # noqa: E402

p95_of, stats = labbench.p95_of, labbench.stats


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        report = fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out, report


class Sequential(futures.ThreadPoolExecutor):
    """A pool with one worker: the checks run one after another."""

    def __init__(self, *args, **kwargs):
        kwargs["max_workers"] = 1
        super().__init__(*args, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rtt-ms", type=float, default=5.0, help="simulated round trip per libvirt call")
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    name = f"bench-pf-{secrets.token_hex(3)}"
    with lab.session(2):
        try:
            uuid = lab.create_guest(name, host="lab-a", hot_mib=4)
            lab.wait_counter_moves("lab-a", name)
            a = services.do_register_host("lab-a", lab.uri("lab-a"))
            b = services.do_register_host("lab-b", lab.uri("lab-b"), sync=False)
            vm = VM.objects.get(uuid=uuid)
            plan = MigrationPlan(vm=vm, source=a, target=b, mode="live")
            report = preflight.run_preflight(plan)  # warm-up (imports, first connections)
            print(f"Preflight of {name} (128 MiB, 1 vCPU, running) lab-a -> lab-b, live, {args.runs} runs")
            print(f"verdict: {report.verdict}; checks: {len(report.results)}")
            dirty = report.result("prediction").details.get("dirty_rate_mib_s")
            print(f"measured dirty rate: {dirty} MiB/s ({report.result('prediction').message})")
            print()

            def fresh():
                prediction._dirty_cache.clear()
                DirtyRateSample.objects.all().delete()
                return preflight.run_preflight(plan)

            def other_process():
                prediction._dirty_cache.clear()  # what a new process starts with
                return preflight.run_preflight(plan)

            rows = [
                ("fresh", "full (fresh dirty-rate measurement)", fresh),
                ("reused", "full (dirty rate reused < 60 s)", lambda: preflight.run_preflight(plan)),
                ("stored", "full (stored dirty rate, other process)", other_process),
                (
                    "quick",
                    "quick (no dirty-rate measurement)",
                    lambda: preflight.run_preflight(plan, measure_dirty_rate=False),
                ),
            ]
            summary = {"runs": args.runs, "p95_ms": {}}
            for key, label, fn in rows:
                samples, rep = timed(fn, args.runs)
                print(f"{label:40s} {stats(samples)}   verdict {rep.verdict}")
                summary["p95_ms"][key] = round(p95_of(samples), 1)

            original = preflight_run.ThreadPoolExecutor
            preflight_run.ThreadPoolExecutor = Sequential
            try:
                samples, rep = timed(
                    lambda: preflight.run_preflight(plan, measure_dirty_rate=False), args.runs
                )
            finally:
                preflight_run.ThreadPoolExecutor = original
            print(f"{'quick, checks run sequentially':40s} {stats(samples)}   verdict {rep.verdict}")

            # On loopback every libvirt call takes ~0.1 ms, so running checks concurrently
            # hardly matters here. Add a round-trip time to every libvirt call (as to a host
            # across a network) to see what concurrency buys.
            rtt = args.rtt_ms / 1000
            real_call = hypervisor.HostConnection.call

            def slow_call(self, what, fn, timeout=None):
                time.sleep(rtt)
                return real_call(self, what, fn, timeout)

            hypervisor.HostConnection.call = slow_call
            try:
                quick = lambda: preflight.run_preflight(plan, measure_dirty_rate=False)  # noqa: E731
                samples, rep = timed(quick, args.runs)
                print(
                    f"{f'quick, +{args.rtt_ms} ms per libvirt call':40s} {stats(samples)}   verdict {rep.verdict}"
                )
                preflight_run.ThreadPoolExecutor = Sequential
                samples, rep = timed(quick, args.runs)
                label = "  same, checks run sequentially"
                print(f"{label:40s} {stats(samples)}   verdict {rep.verdict}")
            finally:
                hypervisor.HostConnection.call = real_call
                preflight_run.ThreadPoolExecutor = original

            virsh = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                subprocess.run(
                    ["virsh", "-c", lab.uri("lab-a"), "domstate", name], capture_output=True, check=True
                )
                virsh.append((time.perf_counter() - t0) * 1000)
            print(f"{'for scale: one `virsh domstate` call':40s} {stats(virsh)}")
            load = os.getloadavg()
            print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (goal: full p95 <= 1000 ms)")
            summary["load"] = round(load[0], 2)
            print(json.dumps(summary))
        finally:
            lab.remove_guest(name)


if __name__ == "__main__":
    main()

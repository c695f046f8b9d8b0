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
[--pairs 6] [--bandwidth 16] [--memory 128]
Uses a throwaway SQLite database and data dir; creates and removes its own guest.
"""

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="kvmweb-bench-migrate-"))
os.environ["KVMWEB_DATA_DIR"] = str(TMP)
os.environ["KVMWEB_SQLITE_PATH"] = str(TMP / "kvmweb.sqlite3")
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.management import call_command  # noqa: E402

import lab  # noqa: E402
from hosts import services as host_services  # noqa: E402
from hosts.models import VM, Host  # noqa: E402
from kvmweb.accounts.roles import OPERATOR  # noqa: E402
from migrations_app.models import MigrationJob  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402
from migrations_app.preflight import run_preflight  # noqa: E402
from migrations_app.services import do_create_job  # noqa: E402


def start_worker():
    log = open(TMP / "qcluster.log", "a")  # noqa: SIM115 - lives as long as the worker
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=dict(os.environ, Q_CLUSTER_NAME="migrations"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    time.sleep(3)  # workers forked and polling
    return proc


def run_kvmweb(user, name, target, bandwidth):
    vm = VM.objects.get(name=name, gone=False)
    plan = MigrationPlan(vm, vm.host, target, "live", {"bandwidth": bandwidth})
    report = run_preflight(plan)  # the wizard's step 4 (not timed: the user reads it)
    acks = [r.id for r in report.warnings]
    t0 = time.monotonic()
    # The confirm POST: the wizard hands over the report the user just read (views._seen_report).
    job = do_create_job(
        vm, target, "live", {"bandwidth": bandwidth}, actor=user, report=report, acknowledged=acks
    )
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


def run_virsh(name, source, target, bandwidth):
    cmd = [
        "virsh",
        "-c",
        lab.uri(source),
        "migrate",
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
        "--bandwidth",
        str(bandwidth),
        name,
        lab.uri(target),
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"virsh failed: {r.stderr.strip()}")
    return wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--bandwidth", type=int, default=16)
    ap.add_argument("--memory", type=int, default=128)
    args = ap.parse_args()

    started = lab.up(2)
    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench-operator", password=secrets.token_hex(8))
    user.groups.add(Group.objects.get(name=OPERATOR))
    hosts = {h: host_services.do_register_host(h, lab.uri(h), sync=False) for h in ("lab-a", "lab-b")}
    name = f"bench-mig-{secrets.token_hex(3)}"
    lab.create_guest(name, host="lab-a", storage="shared", memory_mib=args.memory)
    lab.wait_counter_moves("lab-a", name)
    worker = start_worker()
    where = "lab-a"
    rows = []
    try:
        for h in hosts.values():
            host_services.do_sync_inventory(h)
        for i in range(args.pairs):
            order = ("kvmweb", "virsh") if i % 2 == 0 else ("virsh", "kvmweb")
            pair = {}
            for side in order:
                other = "lab-b" if where == "lab-a" else "lab-a"
                if side == "kvmweb":
                    pair["kvmweb"], pair["detail"] = run_kvmweb(
                        user, name, Host.objects.get(name=other), args.bandwidth
                    )
                else:
                    pair["virsh"] = run_virsh(name, where, other, args.bandwidth)
                    for h in hosts.values():  # kvmweb must learn where virsh put it (not timed)
                        host_services.do_sync_inventory(h)
                where = other
                lab.wait_counter_moves(where, name)
            ratio = pair["kvmweb"] / pair["virsh"]
            rows.append(dict(pair, ratio=ratio))
            d = pair["detail"]
            print(
                f"pair {i + 1}: kvmweb {pair['kvmweb']:.3f} s  virsh {pair['virsh']:.3f} s  ratio {ratio:.3f}"
                f"   (kvmweb: pickup {d['pickup'] * 1000:.0f} ms, claim to libvirt call (checklist again) "
                f"{d['claim_to_call'] * 1000:.0f} ms, migrate call {d['migrate_call']:.3f} s, "
                f"conclude {d['conclude'] * 1000:.0f} ms, call end to recorded {d['after_call'] * 1000:.0f} ms, libvirt elapsed {d['libvirt_elapsed']:.3f} s)",
                flush=True,
            )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        lab.remove_guest(name)
        if started:
            lab.down(hosts=started)
    med = statistics.median
    print()
    print(
        f"live p2p, {args.memory} MiB guest, --bandwidth {args.bandwidth} MiB/s, {len(rows)} alternating pairs"
    )
    print(
        f"kvmweb median {med(r['kvmweb'] for r in rows):.3f} s   virsh median {med(r['virsh'] for r in rows):.3f} s"
    )
    print(
        f"median ratio kvmweb/virsh: {med(r['ratio'] for r in rows):.3f}"
        f"  (min {min(r['ratio'] for r in rows):.3f}, max {max(r['ratio'] for r in rows):.3f}; goal <= 1.05)"
    )
    print(
        f"kvmweb overhead parts (median): queue pickup {med(r['detail']['pickup'] for r in rows) * 1000:.0f} ms, "
        f"claim to libvirt call {med(r['detail']['claim_to_call'] for r in rows) * 1000:.0f} ms, "
        f"call end to recorded {med(r['detail']['after_call'] for r in rows) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()

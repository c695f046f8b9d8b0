#!/usr/bin/env python3
"""Eight concurrent live migrations in a four-host lab: kvmweb (PostgreSQL + Redis, two
"migrations" clusters as if on two worker machines) against eight parallel `virsh migrate`.

The lab has four simulated hosts (lab-a..lab-d, lab.up(4)) and eight tiny guests on shared
storage, two per host, each with a DIFFERENT memory size (so a job that reported another
job's figures would show). A round moves every guest one host on (a->b->c->d->a), all
eight at once:

- kvmweb: the eight wizard confirmations arrive together (eight threads calling
  do_create_job with the checklist each user just read); the jobs go through the real
  path: on_commit enqueue, the ORM broker, two `Q_CLUSTER_NAME=migrations` qcluster
  processes with 4 workers each, the claim, preflight again on the worker, live p2p
  migration with progress polling, completed stats, inventory sync, audit. Wall time from
  the first confirmation to the last job recorded as succeeded.
- virsh: eight `virsh migrate --live --p2p --persistent --undefinesource --bandwidth N`
  processes started together; wall time until the last exits.

Rounds alternate kvmweb / virsh. After each kvmweb round every job is checked: succeeded;
the guest runs on the target (libvirt) and its counter moves there; the VM row points at
the target; the job's memory_total equals ITS guest's memory; data moved > 0; elapsed and
downtime recorded; progress samples written; exactly one worker pickup event.

Run as root: .venv/bin/python benchmarks/concurrent_migrations.py [--rounds 2]
[--bandwidth 32] [--guests 8] [--embedded] [--clusters N] [--workers W]. Uses
DATABASE_URL/REDIS_URL when set, else a throwaway PostgreSQL + Redis (scripts/services.sh).
--embedded measures the embedded default instead: SQLite in the throwaway data directory,
no Redis, one migrations cluster with the default worker count (KVMWEB_MIGRATION_WORKERS
unless --workers). Creates and removes its own guests; stops the lab hosts it started.
Prints the load average and ends with one JSON line of its figures.
"""

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOSTS = ["lab-a", "lab-b", "lab-c", "lab-d"]


def start_services():
    services_dir = tempfile.mkdtemp(prefix="kvmweb-bench-services-")
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "services.sh"), "start"],
        env=dict(os.environ, KVMWEB_SERVICES_DIR=services_dir),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        os.environ[key] = value
    return services_dir


def stop_services(services_dir):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "services.sh"), "stop"],
        env=dict(os.environ, KVMWEB_SERVICES_DIR=services_dir),
        check=False,
    )


def start_cluster(tmp, n, workers=None):
    log = open(tmp / f"qcluster-{n}.log", "ab")  # noqa: SIM115 - lives as long as the worker
    env = dict(os.environ, Q_CLUSTER_NAME="migrations")
    if workers:
        env["KVMWEB_MIGRATION_WORKERS"] = str(workers)
    return subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_cluster(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def machine_busy():
    """CPU seconds the whole machine spent busy so far (every core, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cluster_cpu(clusters):
    """CPU seconds used so far by the migrations clusters' processes (each cluster is a
    session of its own: the qcluster process, its workers, their helper threads) and by
    this process (its confirmation threads and its polling), as (clusters, this process)."""
    sessions = {proc.pid for proc in clusters}
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[3]) in sessions:  # field 6 (session id), counted after the ")"
            total += int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])
    usage = os.times()
    return total / tick, usage.user + usage.system


def kvmweb_round(user, guests, positions, bandwidth, clusters):
    """All guests one host on, through kvmweb; returns (wall seconds, jobs, submit seconds,
    {"workers_cpu": CPU seconds of the clusters, "web_cpu": of the confirmations and this
    process's polling, "busy_cpu": of the whole machine})."""
    from django.db import connections

    from hosts.models import VM, Host
    from migrations_app.models import MigrationJob
    from migrations_app.plan import MigrationPlan
    from migrations_app.preflight import run_preflight
    from migrations_app.services import do_create_job

    options = {"bandwidth": bandwidth}
    prepared = []
    for name in guests:  # the checklist each user reads before confirming (not timed)
        vm = VM.objects.select_related("host").get(name=name, gone=False)
        target = Host.objects.get(name=HOSTS[(HOSTS.index(positions[name]) + 1) % len(HOSTS)])
        assert vm.host.name == positions[name], (name, vm.host.name, positions[name])
        report = run_preflight(MigrationPlan(vm, vm.host, target, "live", dict(options)))
        if report.blocking_reasons([r.id for r in report.warnings], []):
            raise SystemExit(f"preflight blocks {name}: {report.blocking_reasons([], [])}")
        prepared.append((vm, target, report))
    jobs, errors = [None] * len(prepared), []
    go = threading.Barrier(len(prepared) + 1)

    def confirm(i, vm, target, report):
        try:
            go.wait()
            acks = [r.id for r in report.warnings]
            jobs[i] = do_create_job(
                vm, target, "live", dict(options), actor=user, report=report, acknowledged=acks
            )
        except Exception as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=confirm, args=(i, *p)) for i, p in enumerate(prepared)]
    for t in threads:
        t.start()
    cpu0, busy0 = cluster_cpu(clusters), machine_busy()
    t0 = time.monotonic()
    go.wait()
    for t in threads:
        t.join()
    submitted = time.monotonic() - t0
    if errors:
        raise SystemExit(f"a confirmation failed: {errors[0]!r}")
    ids = [j.pk for j in jobs]
    deadline = time.monotonic() + 600
    while MigrationJob.objects.filter(pk__in=ids, status__in=MigrationJob.ACTIVE_STATES).exists():
        if time.monotonic() > deadline:
            raise SystemExit("kvmweb jobs did not finish within 10 minutes")
        time.sleep(0.02)
    wall = time.monotonic() - t0
    cpu1 = cluster_cpu(clusters)
    cpu = {
        "workers_cpu": cpu1[0] - cpu0[0],
        "web_cpu": cpu1[1] - cpu0[1],
        "busy_cpu": machine_busy() - busy0,
    }
    return wall, list(MigrationJob.objects.filter(pk__in=ids).order_by("pk")), submitted, cpu


def check_jobs(jobs, memory_of):
    """Every job's outcome and figures; returns a list of problems (empty = all right)."""
    import lab
    from hosts.models import VM
    from migrations_app.models import MigrationJob

    problems = []
    for job in jobs:
        name = job.vm_name
        if job.status != MigrationJob.SUCCEEDED:
            problems.append(f"{name}: job #{job.pk} {job.status}: {job.error[:200]}")
            continue
        where = lab.where(name)
        if where != {job.target_name: "running"}:
            problems.append(f"{name}: libvirt says {where}, expected running on {job.target_name}")
        else:
            lab.wait_counter_moves(job.target_name, name)  # the guest really runs there
        vm = VM.objects.select_related("host").get(pk=job.vm_id)
        if vm.host is None or vm.host.name != job.target_name:
            problems.append(f"{name}: VM row on {vm.host and vm.host.name}, expected {job.target_name}")
        # libvirt counts the guest's RAM plus a little device memory (ROMs, VGA: ~0.5 MiB
        # here); the guests are 16 MiB apart, so another job's figures cannot pass.
        extra = job.memory_total - (memory_of[name] << 20)
        if not 0 <= extra < 8 << 20:
            problems.append(
                f"{name}: memory_total {job.memory_total} is not its guest's {memory_of[name]} MiB"
            )
        if not job.data_processed > 0:
            problems.append(f"{name}: no data moved recorded")
        if not job.elapsed_ms or job.downtime_ms is None:
            problems.append(f"{name}: elapsed {job.elapsed_ms} / downtime {job.downtime_ms} missing")
        if not job.samples.exists():
            problems.append(f"{name}: no progress samples")
        pickups = job.events.filter(message__startswith="Picked up by worker").count()
        if pickups != 1:
            problems.append(f"{name}: picked up {pickups} times")
    return problems


def virsh_round(guests, positions, bandwidth):
    import lab

    procs = []
    busy0, children0 = machine_busy(), os.times()
    t0 = time.monotonic()
    for name in guests:
        src = positions[name]
        dst = HOSTS[(HOSTS.index(src) + 1) % len(HOSTS)]
        cmd = ["virsh", "-c", lab.uri(src), "migrate", "--live", "--p2p", "--persistent", "--undefinesource"]
        cmd += ["--bandwidth", str(bandwidth), name, lab.uri(dst)]
        procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    failures = []
    for name, proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{name}: {err.strip()}")
    wall = time.monotonic() - t0
    children = os.times()
    cpu = {
        "virsh_cpu": children.children_user
        + children.children_system
        - children0.children_user
        - children0.children_system,
        "busy_cpu": machine_busy() - busy0,
    }
    if failures:
        raise SystemExit("virsh failed: " + "; ".join(failures))
    return wall, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="kvmweb and virsh rounds each")
    ap.add_argument("--bandwidth", type=int, default=32, help="MiB/s per migration (both sides)")
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument(
        "--embedded", action="store_true", help="SQLite, no Redis, one cluster (the default setup)"
    )
    ap.add_argument("--clusters", type=int, help="migrations clusters (default 2; 1 with --embedded)")
    ap.add_argument(
        "--workers", type=int, help="workers per cluster (default 4; the settings' with --embedded)"
    )
    args = ap.parse_args()
    clusters_n = args.clusters or (1 if args.embedded else 2)
    workers = args.workers or (None if args.embedded else 4)

    tmp = Path(tempfile.mkdtemp(prefix="kvmweb-bench-concurrent-"))
    services_dir = None
    if args.embedded:
        for key in ("DATABASE_URL", "REDIS_URL"):
            os.environ.pop(key, None)
        os.environ["KVMWEB_SQLITE_PATH"] = str(tmp / "kvmweb.sqlite3")
    elif not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
        services_dir = start_services()
    os.environ["KVMWEB_DATA_DIR"] = str(tmp)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command

    import lab
    from hosts import services as host_services
    from kvmweb.accounts.roles import OPERATOR

    started = lab.up(len(HOSTS))
    call_command("migrate", verbosity=0)
    user = User.objects.create_user(f"bench-{secrets.token_hex(3)}", password=secrets.token_hex(8))
    user.groups.add(Group.objects.get(name=OPERATOR))
    hosts = {h: host_services.do_register_host(h, lab.uri(h), sync=False) for h in HOSTS}
    tag = secrets.token_hex(3)
    guests, memory_of, positions = [], {}, {}
    clusters = []
    rows = []
    figures = {}
    per = workers
    try:
        for i in range(args.guests):
            name = f"bench-cc-{tag}-{i}"
            host = HOSTS[i % len(HOSTS)]
            memory_of[name] = 96 + 16 * i  # distinct per guest
            guests.append(name)
            positions[name] = host
            lab.create_guest(name, host=host, storage="shared", memory_mib=memory_of[name], fill_mib=32)
        for name in guests:
            lab.wait_counter_moves(positions[name], name)
        for h in hosts.values():
            host_services.do_sync_inventory(h)
        clusters = [start_cluster(tmp, n, workers) for n in range(1, clusters_n + 1)]
        time.sleep(4)  # the clusters forked their workers and poll the queue
        per = workers or settings.Q_CLUSTER["ALT_CLUSTERS"]["migrations"]["workers"]
        where = "SQLite (embedded default)" if args.embedded else "PostgreSQL + Redis"
        print(
            f"{args.guests} concurrent live p2p migrations, guests {min(memory_of.values())}-"
            f"{max(memory_of.values())} MiB on shared storage, --bandwidth {args.bandwidth} MiB/s each, "
            f"4 lab hosts, {lab.virt_type()} guests; kvmweb on {where} with {clusters_n} migrations "
            f"cluster(s) x {per} workers; {os.cpu_count()} CPUs",
            flush=True,
        )
        for r in range(args.rounds):
            for side in ("kvmweb", "virsh") if r % 2 == 0 else ("virsh", "kvmweb"):
                if side == "kvmweb":
                    wall, jobs, submitted, cpu = kvmweb_round(
                        user, guests, positions, args.bandwidth, clusters
                    )
                    problems = check_jobs(jobs, memory_of)
                    elapsed = [j.elapsed_ms / 1000 for j in jobs if j.elapsed_ms]
                    downtime = [j.downtime_ms for j in jobs if j.downtime_ms is not None]
                    ok = sum(j.status == "succeeded" for j in jobs)
                    pickup = [(j.started_at - j.created_at).total_seconds() for j in jobs if j.started_at]
                    around = [
                        (j.finished_at - j.started_at).total_seconds() - j.elapsed_ms / 1000
                        for j in jobs
                        if j.finished_at and j.started_at and j.elapsed_ms
                    ]
                    used = len({j.worker for j in jobs})
                    print(
                        f"round {r + 1} kvmweb: wall {wall:.2f} s ({len(jobs)} confirmations took {submitted:.2f} s); "
                        f"{ok}/{len(jobs)} succeeded on {used} worker processes; libvirt elapsed per job "
                        f"median {statistics.median(elapsed):.2f} s max {max(elapsed):.2f} s; downtime median "
                        f"{statistics.median(downtime):.0f} ms max {max(downtime)} ms; "
                        + ("figures all correct" if not problems else f"PROBLEMS: {problems}")
                        + f"\n    where kvmweb's time goes (median): queue pickup {statistics.median(pickup):.2f} s, "
                        f"worker time around the libvirt migration (preflight again, stats, inventory "
                        f"sync, audit) {statistics.median(around):.2f} s; CPU during the round: kvmweb workers "
                        f"{cpu['workers_cpu']:.2f} s, confirmations {cpu['web_cpu']:.2f} s, whole machine "
                        f"{cpu['busy_cpu']:.2f} s",
                        flush=True,
                    )
                    rows.append(("kvmweb", wall, not problems))
                    figures.setdefault("pickup_s", []).append(round(statistics.median(pickup), 3))
                    figures.setdefault("pickup_max_s", []).append(round(max(pickup), 3))
                    figures.setdefault("around_s", []).append(round(statistics.median(around), 3))
                    figures.setdefault("workers_cpu_s", []).append(round(cpu["workers_cpu"], 2))
                    figures.setdefault("web_cpu_s", []).append(round(cpu["web_cpu"], 2))
                    figures.setdefault("kvmweb_busy_s", []).append(round(cpu["busy_cpu"], 2))
                else:
                    wall, cpu = virsh_round(guests, positions, args.bandwidth)
                    for h in hosts.values():  # kvmweb learns where virsh put them (not timed)
                        host_services.do_sync_inventory(h)
                    for name in guests:
                        dst = HOSTS[(HOSTS.index(positions[name]) + 1) % len(HOSTS)]
                        lab.wait_counter_moves(dst, name)
                    print(
                        f"round {r + 1} virsh:  wall {wall:.2f} s ({len(guests)}/{len(guests)} succeeded); "
                        f"CPU during the round: virsh {cpu['virsh_cpu']:.2f} s, whole machine {cpu['busy_cpu']:.2f} s",
                        flush=True,
                    )
                    rows.append(("virsh", wall, True))
                    figures.setdefault("virsh_cpu_s", []).append(round(cpu["virsh_cpu"], 2))
                    figures.setdefault("virsh_busy_s", []).append(round(cpu["busy_cpu"], 2))
                for name in guests:
                    positions[name] = HOSTS[(HOSTS.index(positions[name]) + 1) % len(HOSTS)]
    finally:
        for proc in clusters:
            stop_cluster(proc)
        for name in guests:
            lab.remove_guest(name)
        if started:
            lab.down(hosts=started)
        if services_dir:
            from django.db import connections

            connections.close_all()
            stop_services(services_dir)
    k = [w for side, w, _ in rows if side == "kvmweb"]
    v = [w for side, w, _ in rows if side == "virsh"]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    summary = {
        "setup": "embedded" if args.embedded else "scale-out",
        "clusters": clusters_n,
        "workers": per,
    }
    summary.update(figures, guests=args.guests, bandwidth=args.bandwidth, load=round(load[0], 2))
    if k and v:
        correct = all(ok for side, _, ok in rows if side == "kvmweb")
        print(
            f"median wall: kvmweb {statistics.median(k):.2f} s, virsh {statistics.median(v):.2f} s, "
            f"ratio {statistics.median(k) / statistics.median(v):.3f} (goal <= 1.3); all kvmweb figures "
            f"correct: {correct}"
        )
        summary.update(kvmweb_s=round(statistics.median(k), 3), virsh_s=round(statistics.median(v), 3))
        summary.update(ratio=round(statistics.median(k) / statistics.median(v), 3), correct=correct)
    else:
        print("NOTHING COMPLETED on one side")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

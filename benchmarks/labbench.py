"""What the lab benchmarks against virsh share (benchmarks/evacuate.py,
benchmarks/migrate_vs_virsh.py): a throwaway kvmweb (SQLite DB and data dir of its own),
an operator, the lab hosts registered, a real migrations worker, and `virsh migrate`.

Call ``setup(prefix)`` before importing anything that needs Django.
"""

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
TMP = None


def setup(prefix):
    """A throwaway data dir and SQLite DB, Django set up. Returns the data dir."""
    global TMP
    sys.path.insert(0, str(ROOT))
    TMP = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["KVMWEB_DATA_DIR"] = str(TMP)
    os.environ["KVMWEB_SQLITE_PATH"] = str(TMP / "kvmweb.sqlite3")
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
    import django

    django.setup()
    return TMP


def p95_of(samples):
    ordered = sorted(samples)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def stats(samples):
    """One line: median, p95 and max of timings in ms."""
    ordered = sorted(samples)
    return f"median {statistics.median(ordered):7.1f} ms   p95 {p95_of(samples):7.1f} ms   max {ordered[-1]:7.1f} ms"


def _cpu_seconds(pid, reaped=False):
    """utime + stime of one process, in s (0 when it is gone); ``reaped``: plus those of
    the children it has waited for (a process that ended is counted by its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def _processes():
    """(pid, command name, process group) of every process still running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield entry.name, (entry / "comm").read_text().strip(), os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue


def cpu_snapshot(worker=None):
    """CPU seconds used so far, by group: this process ("bench": the scheduler's passes
    in evacuate.py), its waited-for children ("virsh"), the worker's process group
    ("worker") and the lab's libvirt daemons (not QEMU: a migration ends the source's
    process, and its CPU with it). Subtract two snapshots (``cpu_delta``) for what a
    phase used."""
    times = os.times()
    found = {"bench": times.user + times.system, "virsh": times.children_user + times.children_system}
    found.update(worker=0.0, libvirt=0.0)
    for pid, comm, pgid in _processes():
        if worker is not None and pgid == worker.pid:
            found["worker"] += _cpu_seconds(pid)
        elif comm in ("libvirtd", "virtqemud"):
            found["libvirt"] += _cpu_seconds(pid)
    return found


def cpu_by_group(groups):
    """CPU seconds used so far by every process on the machine, summed per label: for a
    Python process, the label of its process group when ``groups`` ({pgid: label}) names
    it; otherwise its command name (chromium, qemu-system-x86, libvirtd, ...). A process
    that ended counts for a named group's process that waited for it (virsh for this
    one). Subtract two (``cpu_delta``) for what one side of a comparison cost the
    machine while it ran."""
    found = {}
    for pid, comm, pgid in _processes():
        named = pgid in groups
        label = groups[pgid] if named and comm.startswith("python") else comm
        # Reaped children count only in the named groups (virsh for the bench, the
        # served commands for the cli_server): elsewhere a shell that reaps a long
        # unrelated job would add its CPU to the figures.
        found[label] = found.get(label, 0.0) + _cpu_seconds(pid, reaped=named)
    return found


def cpu_delta(before, after):
    """{group: CPU seconds used between two ``cpu_snapshot``s}."""
    return {k: round(max(0.0, after[k] - before.get(k, 0.0)), 2) for k in after}


def kvmweb(hosts):
    """Migrate the DB, create an operator and register ``hosts`` (no inventory sync).
    Returns (user, {name: Host})."""
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command

    import lab
    from hosts import services as host_services
    from kvmweb.accounts.roles import OPERATOR

    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench-operator", password=secrets.token_hex(8))
    user.groups.add(Group.objects.get(name=OPERATOR))
    return user, {h: host_services.do_register_host(h, lab.uri(h), sync=False) for h in hosts}


def start_worker():
    """A real `Q_CLUSTER_NAME=migrations manage.py qcluster` (its log in the data dir)."""
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


def stop_worker(proc):
    if proc is None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def virsh_migrate(name, source, target, bandwidth=0):
    """`virsh migrate --live --p2p --persistent --undefinesource [--bandwidth B]`; its wall
    time in seconds. SystemExit with virsh's words when it fails."""
    import lab

    cmd = ["virsh", "-c", lab.uri(source), "migrate", "--live", "--p2p", "--persistent", "--undefinesource"]
    if bandwidth:
        cmd += ["--bandwidth", str(bandwidth)]
    t0 = time.monotonic()
    r = subprocess.run([*cmd, name, lab.uri(target)], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"virsh migrate {name} {source} -> {target} failed: {r.stderr.strip()}")
    return wall

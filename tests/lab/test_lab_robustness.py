"""The lab's own robustness: idempotent start, identity checks before any signal, stale
FUSE mounts, taken ports, orphaned guests of killed sessions, one-line CLI errors.

Tests that need a lab directory of their own point lab.core.LAB_DIR at a temp dir: they
never touch the shared lab's daemons, ports or files.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import lab as labkit
from lab import core

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def private_lab_dir(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.setattr(core, "LAB_DIR", tmp_path / "lab")
    core.LAB_DIR.mkdir()
    return core.LAB_DIR


def test_it_reuses_a_running_lab_without_starting_anything(lab):
    before = {h: core._host_pids(h) for h in lab.hosts}
    t0 = time.monotonic()
    assert labkit.up(2) == []
    # Cheap: no host started (the PIDs below are the proof); a start takes far longer
    # than this generous bound, which only a restart in disguise would exceed.
    assert time.monotonic() - t0 < 30
    assert {h: core._host_pids(h) for h in lab.hosts} == before
    assert labkit.is_up(2)
    for h in lab.hosts:
        assert before[h]["tini"] and before[h]["libvirtd"]
        assert lab.conn(h).getHostname() == f"{h}.lab.test"
        pools = {p.name(): p for p in lab.conn(h).listAllStoragePools()}
        assert pools["shared"].isActive() and pools["shared"].autostart()
        assert pools["images"].isActive() and pools["images"].autostart()
    uuids = {lab.conn(h).getCapabilities().split("<uuid>")[1].split("<")[0] for h in lab.hosts}
    assert len(uuids) == len(lab.hosts)  # distinct host UUIDs, or libvirt refuses to migrate


def test_it_never_signals_a_process_its_pid_files_point_at_by_mistake(private_lab_dir):
    # A stale PID file now naming an unrelated live process (here a sleep of ours).
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        hd = private_lab_dir / "lab-a"
        (hd / "run").mkdir(parents=True)
        (hd / "tini.pid").write_text(f"{bystander.pid}\n")
        (hd / "run" / "libvirtd.pid").write_text(f"{bystander.pid}\n")
        (hd / "run" / "qemu").mkdir()
        (hd / "run" / "qemu" / "g.pid").write_text(f"{bystander.pid}")
        assert core._host_pids("lab-a") == {"tini": 0, "libvirtd": 0}
        assert labkit.down(hosts=["lab-a"]) == []
        assert bystander.poll() is None  # still alive: it failed the namespace check
        assert not (hd / "tini.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_it_clears_a_dead_fuse_mount_left_by_a_killed_session(private_lab_dir):
    core._ensure_shared()
    assert core._shared_healthy()
    bindfs = core._bindfs_pid()
    assert bindfs
    os.kill(bindfs, signal.SIGKILL)  # what a killed session leaves: a dead FUSE endpoint
    deadline = time.monotonic() + 60
    while core._alive(bindfs):
        assert time.monotonic() < deadline, "the killed bindfs did not exit"
        time.sleep(0.02)
    try:
        with pytest.raises(OSError):
            os.listdir(core.shared_dir())  # "Transport endpoint is not connected"
        assert core._is_mounted(core.shared_dir()) and not core._shared_healthy()
        core._ensure_shared()
        assert core._shared_healthy() and core._bindfs_pid() not in (0, bindfs)
        (core.shared_dir() / "probe").write_text("x")
        assert (private_lab_dir / "shared-backing" / "probe").read_text() == "x"
    finally:
        core._unmount_shared()
    assert not core._is_mounted(core.shared_dir())
    assert core._bindfs_pid() == 0


def test_it_names_whoever_holds_a_lab_port(private_lab_dir, monkeypatch):
    with socket.socket() as s:
        s.bind((core.ip("lab-d"), 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setattr(core, "LIBVIRTD_PORT", port)
        with pytest.raises(labkit.LabError) as exc:
            core._check_port_free("lab-d")
    msg = str(exc.value)
    assert f"{core.ip('lab-d')}:{port}" in msg and f"pid {os.getpid()}" in msg
    assert "not by a kvmweb lab daemon" in msg


def test_it_sweeps_the_guests_of_a_killed_session_and_spares_live_ones(lab, lab_guest):
    orphan = lab_guest("orphan", wait=False)
    kept = lab_guest("kept", running=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (core.LAB_DIR / "owned" / orphan).write_text(f"{dead.pid} 1\n")  # owner gone
    swept = labkit.sweep_orphans()
    assert orphan in swept and kept not in swept
    assert labkit.where(orphan) == {}
    assert not (core.shared_dir() / f"{orphan}.qcow2").exists()
    assert labkit.where(kept) == {"lab-a": "shut off"}  # its owner (this session) lives


NOBODY = 65534


@pytest.fixture
def lab_copy_for_nobody():
    """A copy of lab/ that the unprivileged user can read, wherever the checkout lives (a
    fresh clone under a 0700 temporary directory is unreadable to that user), and the
    base interpreter, which stays outside the checkout even when the venv is inside it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to run as another user)")
    top = Path(tempfile.mkdtemp(prefix="kvmweb-nobody-", dir="/tmp"))
    try:
        top.chmod(0o755)
        shutil.copytree(ROOT / "lab", top / "lab", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        yield top, python
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_it_reports_not_root_in_one_line(lab_copy_for_nobody):
    top, python = lab_copy_for_nobody
    env = dict(os.environ, KVMWEB_LAB_DIR=str(top / "lab-dir"))
    r = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            python,
            "-I",  # no PYTHON* variables, no user site: nothing from the checkout
            "lab/labctl.py",
            "up",
        ],
        cwd=top,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip()
        == "labctl: error: the KVM lab needs root (simulated hosts use mount namespaces and FUSE)"
    )
    assert "Traceback" not in r.stderr


def test_it_starts_once_when_started_twice_at_once_and_stops_without_leftovers(tmp_path):
    """Two `labctl up` racing on a private lab (own dir, 127.0.7.x): one daemon per host;
    `labctl down` leaves no process in any host namespace and no mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    env = dict(os.environ, KVMWEB_LAB_DIR=str(tmp_path / "lab"), KVMWEB_LAB_NET="127.0.7")
    cmd = [sys.executable, "lab/labctl.py"]
    racers = [
        subprocess.Popen([*cmd, "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [r.communicate(timeout=300)[0] for r in racers]  # a loaded machine starts hosts slowly
    try:
        assert [r.returncode for r in racers] == [0, 0], outputs
        started = [line.split(":")[0] for out in outputs for line in out.splitlines() if ": started" in line]
        assert sorted(started) == ["lab-a", "lab-b"]  # each host started exactly once
        probe = (
            "import lab, json; from lab import core; "
            "print(json.dumps({h: [core._host_pids(h), sorted(core._comm(p) for p in core._ns_processes(h))]"
            " for h in ('lab-a', 'lab-b')}))"
        )
        up = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
        for pids, members in json.loads(up.stdout).values():
            assert pids["tini"] and pids["libvirtd"]
            assert members.count("tini") == 1 and members.count("libvirtd") == 1  # one daemon per host
        r = subprocess.run(
            [*cmd, "guest", "race-g", "--storage", "local"], cwd=ROOT, env=env, capture_output=True
        )
        assert r.returncode == 0, r.stderr
    finally:
        down = subprocess.run([*cmd, "down"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert down.returncode == 0 and "stopped lab-a, lab-b" in down.stdout
    after = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    for pids, members in json.loads(after.stdout).values():
        assert pids == {"tini": 0, "libvirtd": 0} and members == []  # no daemon, no QEMU left
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
    subprocess.run([*cmd, "down", "--purge"], cwd=ROOT, env=env, check=True, capture_output=True)


_OLD_LAB = """
import json, sys, lab
from lab import core
orig = core._write_host_config
def without_tls(name):  # what lab code older than lab/pki.py wrote
    orig(name)
    conf = core.host_dir(name) / "etc" / "libvirtd.conf"
    conf.write_text(conf.read_text().replace("listen_tls = 1", "listen_tls = 0"))
core._write_host_config = without_tls
lab.up(2)
core._write_host_config = orig
before = [lab.tls_ready(h) for h in ("lab-a", "lab-b")]
started = lab.up(2)
print(json.dumps({"before": before, "started": started, "after": [lab.tls_ready(h) for h in ("lab-a", "lab-b")]}))
"""


def test_it_restarts_an_idle_lab_without_tls_listener_and_prints_tls_uris(tmp_path):
    """A private lab (127.0.8.x) started without TLS, idle and unleased, gets it at the next
    up(); `labctl uri --transport tls` names the lab CA's client directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    env = dict(os.environ, KVMWEB_LAB_DIR=str(tmp_path / "lab"), KVMWEB_LAB_NET="127.0.8")
    try:
        r = subprocess.run(
            [sys.executable, "-c", _OLD_LAB], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {
            "before": [False, False],
            "started": ["lab-a", "lab-b"],
            "after": [True, True],
        }
        r = subprocess.run(
            [sys.executable, "lab/labctl.py", "uri", "lab-b", "--transport", "tls"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert (
            r.stdout.strip() == f"qemu+tls://127.0.8.3/system?pkipath={tmp_path / 'lab' / 'pki' / 'client'}"
        )
        virsh = subprocess.run(["virsh", "-c", r.stdout.strip(), "hostname"], capture_output=True, text=True)
        assert virsh.stdout.strip() == "lab-b.lab.test", virsh.stderr
        key = tmp_path / "lab" / "pki" / "client" / "clientkey.pem"
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        subprocess.run(
            [sys.executable, "lab/labctl.py", "down", "--purge"], cwd=ROOT, env=env, capture_output=True
        )

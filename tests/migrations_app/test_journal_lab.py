"""Cold and offline jobs are safe at every step: the worker is killed right after each
journaled step (the journal's test hook, not a sleep), reconcile runs, and libvirt shows
one VM on one host, running when it ran before, with nothing this job made left behind.

Each scenario is a real process (tests/migrations_app/crash_worker.py) against the real
lab; scenarios run a few at a time because each waits mostly on libvirt and QEMU.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import lab as labkit
from tests.migrations_app.conftest import ROOT

pytestmark = pytest.mark.lab

COLD = {"force_off": True, "shutdown_timeout": 1}
# step -> (final status, where the guest ends: {host: state})
ROLLED_BACK = ("failed", {"lab-a": "running"})
MOVED = ("succeeded", {"lab-b": "running"})
COLD_LOCAL = {
    "begin": ROLLED_BACK,
    "shutdown:started": ROLLED_BACK,
    "force_off": ROLLED_BACK,
    "storage": ROLLED_BACK,
    "create_volume": ROLLED_BACK,
    "copy:started": ROLLED_BACK,
    "copy": ROLLED_BACK,
    "define:started": ROLLED_BACK,
    "define": MOVED,
    "undefine_source": MOVED,
    "start": MOVED,
    "verify": MOVED,
}
COLD_SHARED = {"migrate_definition:started": ROLLED_BACK, "migrate_definition": MOVED}
OFFLINE = {
    "migrate_definition:started": ("failed", {"lab-a": "shut off"}),
    "migrate_definition": ("succeeded", {"lab-b": "shut off"}),
}


def _crash_and_reconcile(c, guest, mode, options, step):
    """Run the job in a worker that dies after ``step``, then reconcile. Returns the
    job row and the worker's exit code."""
    r = subprocess.run(
        [sys.executable, "tests/migrations_app/crash_worker.py", guest, "lab-b", mode, json.dumps(options)],
        cwd=ROOT,
        env=dict(c.env, KVMWEB_CRASH_AFTER_STEP=step),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines and "id" in json.loads(lines[0]), f"{step}: worker output {r.stdout}{r.stderr}"
    job_id = json.loads(lines[0])["id"]
    # Only this job: the other scenarios' workers are alive, between two heartbeats.
    reconciled = c.manage("reconcile_jobs", "--stale", "0", "--job", str(job_id))
    row = c.q("select status, error, journal from migrations_app_migrationjob where id=?", job_id)[0]
    return {
        "status": row[0],
        "error": row[1]
        or f"(reconcile said: {reconciled.stdout.strip()} {reconciled.stderr.strip()[-1500:]})",
        "journal": json.loads(row[2]),
        "exit": r.returncode,
        "id": job_id,
    }


def _run_scenarios(workerless, lab_guest, table, mode, options, *, storage, running):
    guests = {
        step: lab_guest(f"jr-{mode[:3]}", storage=storage, running=running, wait=False) for step in table
    }

    def one(step):
        return step, _crash_and_reconcile(workerless, guests[step], mode, options, step)

    # Four at a time (three took 207 s for the cold-copy table, four 178 s, on the same
    # loaded 2-core machine; six were no faster than four, 116 s vs 110 s): each scenario's
    # reconcile is `--job ID`, so it never takes the job of a neighbour whose live worker is
    # between two heartbeats.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(one, table))
    problems = []
    for step, (status, where) in table.items():
        got, guest = results[step], guests[step]
        seen = labkit.where(guest)
        if got["exit"] != 70:
            problems.append(f"{step}: the worker was not stopped at the step (exit {got['exit']})")
        if got["status"] != status or seen != where:
            problems.append(
                f"{step}: {got['status']} with {seen}, wanted {status} with {where}: {got['error']}"
            )
        if storage == "local" and status == "failed":
            target_copy = labkit.disk_path(guest, "local", "lab-b")[0]
            if target_copy.exists():
                problems.append(f"{step}: the volume the job created on lab-b was left behind")
        if status == "failed" and "stopped" not in got["error"]:
            problems.append(f"{step}: the message does not say the worker stopped: {got['error']}")
    assert not problems, "\n".join(problems)
    return results, guests


def test_it_finishes_or_rolls_back_a_cold_copy_killed_at_every_step(workerless, lab_guest):
    results, guests = _run_scenarios(
        workerless, lab_guest, COLD_LOCAL, "cold", COLD, storage="local", running=True
    )
    # Forward: the source disk stays (not asked to remove it) and is recorded as a copy.
    job_id = results["define"]["id"]
    left = workerless.q("select host_name, path from migrations_app_leftcopy where job_id=?", job_id)
    assert [h for h, _p in left] == ["lab-a"]
    # Rolled back after the copy: the message says what was undone.
    assert "removed the volume" in results["copy"]["error"].lower()
    assert "started the vm again on lab-a" in results["copy"]["error"].lower()


def test_it_finishes_or_rolls_back_a_cold_move_on_shared_storage_killed_at_every_step(workerless, lab_guest):
    _run_scenarios(workerless, lab_guest, COLD_SHARED, "cold", COLD, storage="shared", running=True)


def test_it_finishes_or_rolls_back_an_offline_move_killed_at_every_step(workerless, lab_guest):
    _run_scenarios(workerless, lab_guest, OFFLINE, "offline", {}, storage="shared", running=False)

"""The stale-copy story on the real lab: a cold move keeps the source disk; the VM's
data changes on the target; a move back must never boot the old copy as if it were
shared storage. kvmweb proves sharing with a probe file, names the copy a job left, lets
an operator delete it (audited), and then copies the current data back."""

import os

import pytest

import lab as labkit
from hosts import services as host_services
from hosts.models import VM
from kvmweb.audit.models import AuditEvent
from migrations_app import runner
from migrations_app.models import LeftCopy, MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight
from migrations_app.services import do_create_job, do_delete_left_copy

pytestmark = pytest.mark.lab

MARKER = b"kvmweb-newer-data-on-lab-b"


def _check(guest, target, mode="cold"):
    """Sync both hosts, then the checklist for moving ``guest`` to ``target``."""
    for host in target.__class__.objects.all():
        assert not host_services.do_sync_inventory(host)["error"]
    vm = VM.objects.get(uuid=guest.uuid)
    return vm, run_preflight(MigrationPlan(vm, vm.host, target, mode, {}), measure_dirty_rate=False)


def _cold_move(user, guest, target):
    """The wizard's path for a cold move with the defaults; returns the finished job."""
    vm, report = _check(guest, target)
    assert not report.fails, [(r.id, r.message) for r in report.fails]
    job = do_create_job(
        vm, target, "cold", {}, actor=user, report=report, acknowledged=[r.id for r in report.warnings]
    )
    runner.run_job(job.pk)
    job.refresh_from_db()
    assert job.status == MigrationJob.SUCCEEDED, job.error
    return job


def test_it_never_boots_a_stale_copy_and_moves_the_newer_data_back(hosts, lab_guest, operator):
    guest = lab_guest("stale", storage="local", running=False)
    on_a, inside = labkit.disk_path(guest, "local", "lab-a")
    on_b, _ = labkit.disk_path(guest, "local", "lab-b")

    # 1. Cold A -> B with the defaults: the source disk stays on A, recorded as a copy.
    job = _cold_move(operator, guest, hosts["lab-b"])
    assert on_a.exists() and on_b.exists()
    (left,) = LeftCopy.objects.filter(vm=job.vm, removed_at=None)
    assert (left.host_name, left.path, left.job_id) == ("lab-a", inside, job.pk)

    # 2. New data lands in the disk on B (written into the image while the VM is off).
    with open(on_b, "ab") as f:
        f.write(MARKER)
    assert MARKER not in on_a.read_bytes()

    # 3. Cold B -> A: the file at the same path on A is proved a different file, named
    #    as the copy job #N left, and the move is refused.
    _vm, report = _check(guest, hosts["lab-a"])
    storage = next(r for r in report.results if r.id == "storage")
    assert storage.status == "fail", storage.message
    assert "different file" in storage.message and f"job #{job.pk}" in storage.message
    assert storage.details["disks"][0]["shared_proof"] is False

    # 4. The operator deletes the copy from the VM page's service: audited, file gone.
    do_delete_left_copy(left, operator)
    assert not on_a.exists()
    left.refresh_from_db()
    assert left.removed_at is not None and left.removed_by_name == "operator"
    assert AuditEvent.objects.filter(action="leftcopy.delete", outcome=AuditEvent.SUCCESS).count() == 1

    # 5. Now the move back copies the current disk: the newer data is on A afterwards.
    _cold_move(operator, guest, hosts["lab-a"])
    assert MARKER in on_a.read_bytes()
    assert labkit.where(guest) == {"lab-a": "shut off"}


def test_it_proves_shared_storage_with_a_probe_and_leaves_no_probe_behind(hosts, lab_guest):
    guest = lab_guest("probe", storage="shared", running=False)
    _vm, report = _check(guest, hosts["lab-b"], "offline")
    storage = next(r for r in report.results if r.id == "storage")
    assert storage.status == "pass", storage.message
    assert storage.details["disks"][0]["shared_proof"] is True
    mine = f".kvmweb-probe-{os.getpid()}-"
    assert not [p for p in labkit.shared_dir().iterdir() if p.name.startswith(mine)]

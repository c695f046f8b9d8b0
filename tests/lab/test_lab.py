"""Proofs that the lab is real: migrations between two real libvirtd hosts with real QEMU
guests, through libvirt-python, and kvmweb's inventory sync following each move.

The guest's counter lives in guest RAM and only a running guest increments it; a guest
that booted afresh on the target would start again from 0 (after filling its RAM).  So a
target counter at or above the source's last value, and still moving, proves the RAM state
itself was transferred.
"""

import threading
import time

import libvirt
import pytest

from hosts import services
from hosts.models import VM, VMLocation

pytestmark = pytest.mark.lab

LIVE = libvirt.VIR_MIGRATE_LIVE
P2P = libvirt.VIR_MIGRATE_PEER2PEER
PERSIST = libvirt.VIR_MIGRATE_PERSIST_DEST
UNDEF = libvirt.VIR_MIGRATE_UNDEFINE_SOURCE


def _absent(conn, uuid):
    try:
        conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    return False


def _wait_counter_at_least(lab, host, name, value, timeout=60):
    deadline = time.monotonic() + timeout
    while lab.read_counter(host, name) < value:
        assert time.monotonic() < deadline, f"counter of {name} stayed below {value}"
        time.sleep(0.05)
    return lab.read_counter(host, name)


@pytest.fixture
def registered(lab, db):
    """lab-a and lab-b registered in kvmweb (each registration syncs its inventory)."""
    return {h: services.do_register_host(h, lab.uri(h)) for h in ("lab-a", "lab-b")}


def _sync(hosts):
    for host in hosts.values():
        summary = services.do_sync_inventory(host)
        assert not summary["error"], summary


def _vm_row(guest):
    return VM.objects.select_related("host").get(uuid=guest.uuid)


def test_it_live_migrates_a_running_guest_and_its_ram_state_moves(lab, lab_guest, registered):
    guest = lab_guest("lab-live")
    _sync(registered)
    vm = _vm_row(guest)
    assert vm.host.name == "lab-a" and vm.state == VM.RUNNING
    trail = VMLocation.objects.filter(vm=vm).count()

    dom = lab.conn("lab-a").lookupByUUIDString(guest.uuid)
    before = _wait_counter_at_least(lab, "lab-a", guest, 5)
    dom.migrateToURI3(lab.uri("lab-b"), {}, LIVE | P2P | PERSIST | UNDEF)

    moved = lab.conn("lab-b").lookupByUUIDString(guest.uuid)
    assert moved.isActive() and moved.isPersistent()
    after = lab.read_counter("lab-b", guest)
    assert after >= before  # continued from the source's value, not a fresh boot from 0
    assert lab.wait_counter_moves("lab-b", guest) > after  # and still executing there
    assert _absent(lab.conn("lab-a"), guest.uuid)

    _sync(registered)
    vm = _vm_row(guest)
    assert vm.host.name == "lab-b" and vm.state == VM.RUNNING and not vm.gone
    assert VMLocation.objects.filter(vm=vm).count() == trail + 1
    assert VMLocation.objects.filter(vm=vm).first().host_name == "lab-b"


def test_it_aborts_a_migration_and_the_guest_keeps_running_on_the_source(lab, lab_guest, registered):
    guest = lab_guest("lab-abort")
    _sync(registered)
    dom = lab.conn("lab-a").lookupByUUIDString(guest.uuid)
    failure = []

    def migrate():
        try:
            # 4 MiB/s against 32 MiB of dirtied RAM: ~8 s, plenty of time to abort.
            dom.migrateToURI3(
                lab.uri("lab-b"), {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 4}, LIVE | P2P | PERSIST | UNDEF
            )
        except libvirt.libvirtError as exc:
            failure.append(exc)

    worker = threading.Thread(target=migrate)
    worker.start()
    deadline = time.monotonic() + 60  # a backstop: a loaded machine starts the job slowly
    while dom.jobStats().get("memory_processed", 0) <= 0:
        assert time.monotonic() < deadline, "migration job never showed progress"
        time.sleep(0.05)
    dom.abortJob()
    worker.join(60)
    assert not worker.is_alive()

    assert failure and failure[0].get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    lab.wait_counter_moves("lab-a", guest)
    assert _absent(lab.conn("lab-b"), guest.uuid)
    assert not any(d.UUIDString() == guest.uuid for d in lab.conn("lab-b").listAllDomains())

    trail = VMLocation.objects.filter(vm=_vm_row(guest)).count()
    _sync(registered)
    vm = _vm_row(guest)
    assert vm.host.name == "lab-a" and vm.state == VM.RUNNING and not vm.gone
    assert VMLocation.objects.filter(vm=vm).count() == trail  # it never moved


def test_it_live_migrates_a_local_disk_guest_with_storage_copy(lab, lab_guest, registered):
    import lab as labkit

    guest = lab_guest("lab-copy", storage="local")
    src_disk = labkit.local_dir("lab-a") / f"{guest}.qcow2"
    dst_disk = labkit.local_dir("lab-b") / f"{guest}.qcow2"
    assert src_disk.exists() and not dst_disk.exists()
    _sync(registered)
    trail = VMLocation.objects.filter(vm=_vm_row(guest)).count()

    dom = lab.conn("lab-a").lookupByUUIDString(guest.uuid)
    before = _wait_counter_at_least(lab, "lab-a", guest, 5)
    flags = LIVE | P2P | PERSIST | UNDEF | libvirt.VIR_MIGRATE_NON_SHARED_DISK
    dom.migrateToURI3(lab.uri("lab-b"), {}, flags)

    moved = lab.conn("lab-b").lookupByUUIDString(guest.uuid)
    assert moved.isActive()
    assert f"{labkit.LOCAL_IN_HOST}/{guest}.qcow2" in moved.XMLDesc()
    assert dst_disk.stat().st_size > 0  # the target pool pre-created it and NBD filled it
    assert lab.read_counter("lab-b", guest) >= before
    lab.wait_counter_moves("lab-b", guest)
    assert _absent(lab.conn("lab-a"), guest.uuid)
    assert src_disk.exists()  # libvirt leaves the source copy behind; kvmweb must clean it

    _sync(registered)
    vm = _vm_row(guest)
    assert vm.host.name == "lab-b" and vm.state == VM.RUNNING
    assert VMLocation.objects.filter(vm=vm).count() == trail + 1


def test_it_moves_a_shut_off_guest_offline(lab, lab_guest, registered):
    guest = lab_guest("lab-offline", running=False)
    _sync(registered)
    vm = _vm_row(guest)
    assert vm.host.name == "lab-a" and vm.state == VM.SHUTOFF
    trail = VMLocation.objects.filter(vm=vm).count()

    dom = lab.conn("lab-a").lookupByUUIDString(guest.uuid)
    dom.migrate3(lab.conn("lab-b"), {}, libvirt.VIR_MIGRATE_OFFLINE | PERSIST | UNDEF)

    assert _absent(lab.conn("lab-a"), guest.uuid)
    moved = lab.conn("lab-b").lookupByUUIDString(guest.uuid)
    assert moved.isPersistent() and not moved.isActive()

    _sync(registered)
    vm = _vm_row(guest)
    assert vm.host.name == "lab-b" and vm.state == VM.SHUTOFF
    assert VMLocation.objects.filter(vm=vm).count() == trail + 1

    moved.create()  # the definition works on the target: its disk is on shared storage
    lab.wait_counter_moves("lab-b", guest)

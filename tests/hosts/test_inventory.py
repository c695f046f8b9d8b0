"""Inventory sync against libvirt's test driver: facts, VMs, moves by UUID, gone VMs."""

import pytest

from hosts import services
from hosts.models import VM, Host, VMLocation
from kvmweb.audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def register(name, path):
    return services.do_register_host(name, f"test://{path}")


def test_it_stores_host_facts(node_xml):
    host = register("a", node_xml("a"))
    assert host.status == Host.REACHABLE
    assert host.cpus == 32 and host.memory_total == 64 * 1024**3
    assert host.hypervisor_type == "TEST" and host.libvirt_version >= 9_000_000
    assert host.hostname  # the test driver reports no host UUID; the lab tests check it
    assert host.pools[0]["name"] == "shared" and host.pools[0]["path"] == "/var/lib/libvirt/shared"
    assert 0 < host.pools[0]["available"] <= host.pools[0]["capacity"]
    assert host.networks == [{"name": "default", "bridge": "virbr0", "active": True}]
    event = AuditEvent.objects.get(action="host.register")
    assert event.target_name == "a" and event.details["uri"] == host.uri


def test_it_syncs_every_vm_with_its_details(node_xml):
    host = register("a", node_xml("a"))
    vms = {vm.name: vm for vm in VM.objects.all()}
    assert set(vms) == {"web1", "db1", "batch1"}
    web = vms["web1"]
    assert web.host == host and web.state == "running" and web.vcpus == 2
    assert web.memory == 2048 * 1024**2
    assert web.disks[0]["source"] == "/var/lib/libvirt/shared/web1.qcow2"
    assert web.disks[0]["cache"] == "none" and web.disks[0]["format"] == "qcow2"
    assert web.interfaces == [
        {"type": "network", "network": "default", "bridge": "", "mac": "52:54:00:aa:bb:01", "model": "virtio"}
    ]
    assert vms["db1"].state == "shutoff" and vms["batch1"].state == "paused"
    assert VMLocation.objects.filter(vm=web, host=host, via="sync").count() == 1
    sync_event = AuditEvent.objects.get(action="inventory.sync")
    assert sorted(sync_event.details["added"]) == ["batch1", "db1", "web1"]


def test_it_follows_a_vm_moved_to_another_host_by_uuid(node_xml, alice):
    text = node_xml("a").read_text()
    a = register("a", node_xml("a"))
    web = VM.objects.get(name="web1")
    web.owner_user = alice
    web.save()
    # Host b now holds web1 (same UUID), host a no longer does.
    start = text.index('<domain type="test">')
    end = text.index("</domain>", start) + len("</domain>")
    node_xml("a", text[:start] + text[end:])
    b_text = text.replace("<name>db1</name>", "<name>db1-b</name>").replace("555555555502", "555555555592")
    b_text = b_text.replace("<name>batch1</name>", "<name>batch1-b</name>").replace(
        "555555555503", "555555555593"
    )
    b = register("b", node_xml("b", b_text))
    web.refresh_from_db()
    assert web.host == b and not web.gone and web.owner_user == alice
    assert list(web.locations.values_list("host_name", flat=True)) == ["b", "a"]
    assert VM.objects.filter(uuid=web.uuid).count() == 1
    services.do_sync_inventory(a)
    web.refresh_from_db()
    assert web.host == b and not web.gone  # a's sync does not claim it back


def test_it_marks_vanished_vms_gone_and_keeps_them(node_xml):
    path = node_xml("a")
    host = register("a", path)
    text = path.read_text()
    start = text.index('<domain type="test" xmlns:test')
    end = text.index("</domain>", start) + len("</domain>")
    path.write_text(text[:start] + text[end:])
    summary = services.do_sync_inventory(host)
    assert summary["gone"] == ["db1"]
    db1 = VM.objects.get(name="db1")
    assert db1.gone and db1.host == host
    assert AuditEvent.objects.filter(action="inventory.sync", details__gone=["db1"]).exists()


def test_it_keeps_vms_when_the_host_is_unreachable(node_xml):
    path = node_xml("a")
    host = register("a", path)
    Host.objects.filter(pk=host.pk).update(uri="qemu+tcp://127.0.0.1:1/system")
    host.refresh_from_db()
    summary = services.do_sync_inventory(host)
    host.refresh_from_db()
    assert host.status == Host.UNREACHABLE and "connection refused" in host.last_error.lower()
    assert summary["error"] and VM.objects.filter(gone=False).count() == 3


def test_it_lets_an_active_migration_own_the_vms_location(node_xml, admin):
    """During a migration the domain exists on both hosts; a sync of either must not move
    or bury the row: the migration runner decides where the VM is."""
    from migrations_app.models import MigrationJob

    text = node_xml("a").read_text()
    a = register("a", node_xml("a"))
    web = VM.objects.get(name="web1")
    b = register(
        "b",
        node_xml(
            "b",
            text.replace("555555555502", "555555555592")
            .replace("<name>db1", "<name>db1-b")
            .replace("555555555503", "555555555593")
            .replace("<name>batch1", "<name>batch1-b"),
        ),
    )
    web.refresh_from_db()
    assert web.host == b  # no job: a plain sync follows the UUID
    MigrationJob.objects.create(
        vm=web,
        vm_name="web1",
        source=b,
        source_name="b",
        target=a,
        target_name="a",
        mode="live",
        status=MigrationJob.RUNNING,
    )
    services.do_sync_inventory(a)
    web.refresh_from_db()
    assert web.host == b and not web.gone


def test_it_ignores_a_listing_older_than_the_vms_last_move(node_xml):
    from datetime import timedelta

    from django.utils import timezone

    a = register("a", node_xml("a"))
    web = VM.objects.get(name="web1")
    b = Host.objects.create(name="b", uri="test:///default")
    listed_at = timezone.now()
    # The migration moved the row after host a was listed (still showing web1).
    web.host = b
    web.save()
    VMLocation.objects.create(
        vm=web, host=b, host_name="b", at=listed_at + timedelta(seconds=1), via="migration"
    )
    from hosts import hypervisor

    with hypervisor.session(a.uri) as conn:
        records = conn.domains()
    services.apply_inventory(a, records, listed_at=listed_at)
    web.refresh_from_db()
    assert web.host == b


def test_it_applies_a_partial_read_without_burying_the_vms_it_did_not_read(node_xml):
    """What a migration's conclusion does: only the moved VM is read on the target."""
    from hosts import hypervisor

    a = register("a", node_xml("a"))
    b = Host.objects.create(name="b", uri="test:///default")
    web = VM.objects.get(name="web1")
    with hypervisor.session(a.uri) as conn:
        record = conn.domain_record(str(web.uuid))
    VM.objects.filter(pk=web.pk).update(host=b)  # as if it had been elsewhere
    synced = Host.objects.get(pk=a.pk).last_sync_at
    summary = services.apply_inventory(a, [record], via="migration", partial=True)
    web.refresh_from_db()
    assert web.host == a and summary["moved"] == ["web1"] and summary["gone"] == []
    assert VM.objects.filter(host=a, gone=False).count() == 3  # db1, batch1 untouched
    assert Host.objects.get(pk=a.pk).last_sync_at == synced  # not a full sync
    assert VMLocation.objects.filter(vm=web, host=a, via="migration").exists()

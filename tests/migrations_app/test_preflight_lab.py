"""The preflight checklist against real libvirt on the KVM lab (lab-a -> lab-b).

Every failing case here is produced for real on the lab hosts: a disk on local storage,
a network that exists only on the source (then inactive on the target), a same-name VM
and a stale same-UUID definition on the target, a snapshot, a margin larger than the
target's free memory, a shut-off VM under Live, a migration job and a block copy already
running, a guest dirtying memory faster than a bandwidth cap, an unreachable target.
"""

import json
import secrets
import threading
import time
import xml.etree.ElementTree as ET

import libvirt
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

import lab as labkit
from hosts import services
from hosts.models import VM
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import rank_targets, registry, run_preflight

pytestmark = pytest.mark.lab


def _vm(hosts, guest):
    services.do_sync_inventory(hosts[guest.host])
    return VM.objects.select_related("host").get(uuid=guest.uuid)


def _run(vm, target, mode="live", options=None, **kwargs):
    kwargs.setdefault("measure_dirty_rate", False)
    plan = MigrationPlan.for_vm(vm, target, mode, options or {})
    return run_preflight(plan, **kwargs)


def _by_id(report):
    return {r.id: r for r in report.results}


def _undefine(conn, name):
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()


def test_it_passes_every_check_for_a_running_guest_on_shared_storage(lab, lab_guest, hosts):
    guest = lab_guest("pf-ok", hot_mib=4)
    vm = _vm(hosts, guest)
    report = _run(vm, hosts["lab-b"], "live", measure_dirty_rate=True)
    results = _by_id(report)
    assert report.verdict == "pass", [
        (r.id, r.status, r.message) for r in report.results if r.status != "pass"
    ]
    assert all(r.status == "pass" for r in report.results)
    assert len(results) == len(registry.checks())
    # Real facts, not placeholders.
    assert results["same_host"].details["source_uuid"] != results["same_host"].details["target_uuid"]
    assert results["storage"].details["disks"][0]["shared"] is True
    assert results["storage"].details["disks"][0]["visible_on_target"] is True
    assert results["machine"].details["machine"].startswith("pc-i440fx")
    assert results["memory"].details["target_free_mib"] > 128
    prediction = results["prediction"].details
    assert prediction["converges"] is True
    assert "measured by libvirt" in prediction["dirty_rate_source"], (results["vm_state"].details, prediction)
    assert prediction["dirty_rate"]["period"] >= 1
    assert report.plan["flag_names"] == ["live", "peer2peer", "persist_dest", "undefine_source"]
    assert "--live --p2p --persistent --undefinesource" in report.plan["virsh"]


def test_it_fails_a_local_disk_under_live_and_plans_the_copy_under_live_copy(lab, lab_guest, hosts):
    guest = lab_guest("pf-local", storage="local", wait=False)
    vm = _vm(hosts, guest)
    live = _by_id(_run(vm, hosts["lab-b"], "live"))["storage"]
    assert live.status == "fail"
    assert "/var/lib/libvirt/images/" in live.message
    assert "Live with storage copy" in live.remedy
    assert live.details["disks"][0]["visible_on_target"] is False

    copy = _by_id(_run(vm, hosts["lab-b"], "live-copy"))["storage"]
    assert copy.status == "pass", copy.message
    assert copy.details["copy"] == ["vda"]
    assert copy.details["disks"][0]["copy_to_pool"] == "images"
    assert copy.details["copy_pools"]["images"]["need"] > 0


def test_it_fails_offline_for_a_shut_off_guest_on_local_storage(lab, lab_guest, hosts):
    guest = lab_guest("pf-offl", storage="local", running=False)
    vm = _vm(hosts, guest)
    results = _by_id(_run(vm, hosts["lab-b"], "offline"))
    assert results["vm_state"].status == "pass"
    assert results["storage"].status == "fail"
    assert "Cold" in results["storage"].remedy


def test_it_fails_a_shut_off_guest_under_live_and_passes_it_cold(lab, lab_guest, hosts):
    guest = lab_guest("pf-off", running=False)
    vm = _vm(hosts, guest)
    assert vm.state == VM.SHUTOFF
    report = _run(vm, hosts["lab-b"], "live")
    state = _by_id(report)["vm_state"]
    assert report.verdict == "fail" and state.status == "fail"
    assert "needs a running VM" in state.message
    assert "start" in state.remedy
    cold = _run(vm, hosts["lab-b"], "cold")
    assert cold.verdict == "pass", [(r.id, r.message) for r in cold.fails + cold.warnings]
    assert cold.plan["options"]["start_on_target"] is False  # it was not running


def test_it_fails_a_network_missing_on_the_target_then_one_not_started(lab, lab_guest, hosts):
    net = f"pf-net-{secrets.token_hex(3)}"
    bridge = f"pfbr{secrets.token_hex(3)}"
    netxml = f"<network><name>{net}</name><bridge name='{bridge}' stp='off'/></network>"
    a, b = lab.conn("lab-a"), lab.conn("lab-b")
    source_net = a.networkDefineXML(netxml)
    target_net = None
    try:
        source_net.create()
        guest = lab_guest("pf-net", running=False)
        dom = a.lookupByName(guest)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        iface = ET.SubElement(root.find("devices"), "interface", {"type": "network"})
        ET.SubElement(iface, "source", {"network": net})
        ET.SubElement(iface, "model", {"type": "virtio"})
        a.defineXML(ET.tostring(root, encoding="unicode"))
        a.lookupByName(guest).create()
        vm = _vm(hosts, guest)

        missing = _by_id(_run(vm, hosts["lab-b"], "live"))["networks"]
        assert missing.status == "fail"
        assert f"Network {net} does not exist on lab-b" in missing.message
        assert "net-define" in missing.remedy and "net-start" in missing.remedy
        assert missing.details["target_networks"][net]["exists"] is False

        target_net = b.networkDefineXML(netxml.replace(bridge, bridge + "b"))
        inactive = _by_id(_run(vm, hosts["lab-b"], "live"))["networks"]
        assert inactive.status == "fail"
        assert "is not active" in inactive.message
        assert f"net-start {net}" in inactive.remedy

        target_net.create()
        ok = _by_id(_run(vm, hosts["lab-b"], "live"))["networks"]
        assert ok.status == "pass", ok.message
    finally:
        for n in (target_net, source_net):
            if n is None:
                continue
            try:
                if n.isActive():
                    n.destroy()
                n.undefine()
            except libvirt.libvirtError:
                pass


def test_it_fails_on_a_same_name_vm_and_warns_about_a_stale_definition_on_the_target(lab, lab_guest, hosts):
    guest = lab_guest("pf-coll", wait=False)
    vm = _vm(hosts, guest)
    b = lab.conn("lab-b")
    other = f"<domain type='qemu'><name>{guest}</name><memory unit='MiB'>16</memory><os><type arch='x86_64'>hvm</type></os></domain>"
    b.defineXML(other)
    try:
        result = _by_id(_run(vm, hosts["lab-b"], "live"))["collision"]
        assert result.status == "fail" and not result.overridable
        assert "different VM named" in result.message
        assert "domrename" in result.remedy
        assert result.details["by_name"]["uuid"] != guest.uuid
    finally:
        _undefine(b, guest)
    # A stale copy: same UUID and name, shut off (what a migration without
    # --undefinesource leaves behind).
    stale = lab.conn("lab-a").lookupByName(guest).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    b.defineXML(stale)
    try:
        result = _by_id(_run(vm, hosts["lab-b"], "live"))["collision"]
        assert result.status == "warn"  # libvirt replaces it (seen on the lab); a person should know
        assert "stale" in result.message
        assert f"undefine {guest}" in result.remedy
        assert result.details["by_uuid"]["uuid"] == guest.uuid
    finally:
        _undefine(b, guest)


def test_it_fails_a_vm_with_a_snapshot(lab, lab_guest, hosts):
    guest = lab_guest("pf-snap", running=False)
    dom = lab.conn("lab-a").lookupByName(guest)
    dom.snapshotCreateXML("<domainsnapshot><name>before-upgrade</name></domainsnapshot>", 0)
    vm = _vm(hosts, guest)
    result = _by_id(_run(vm, hosts["lab-b"], "offline"))["snapshots"]
    assert result.status == "fail" and not result.overridable  # libvirt would refuse anyway
    assert "before-upgrade" in result.message
    assert "snapshot-delete" in result.remedy and "--metadata" in result.remedy
    assert result.details["snapshots"] == ["before-upgrade"]


def test_it_fails_when_the_memory_margin_exceeds_the_targets_free_memory(lab, lab_guest, hosts, settings):
    guest = lab_guest("pf-mem", wait=False)
    vm = _vm(hosts, guest)
    free_mib = lab.conn("lab-b").getFreeMemory() // (1024 * 1024)
    settings.KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB = free_mib  # guest (128 MiB) + margin > free
    result = _by_id(_run(vm, hosts["lab-b"], "live"))["memory"]
    assert result.status == "fail" and result.overridable
    assert result.details["margin_mib"] == free_mib
    assert result.details["needed_mib"] > result.details["target_free_mib"]
    # The argument overrides the setting.
    assert _by_id(_run(vm, hosts["lab-b"], "live", memory_margin_mib=64))["memory"].status == "pass"


def test_it_fails_while_another_migration_job_runs_on_the_vm(lab, lab_guest, hosts):
    guest = lab_guest("pf-job")
    vm = _vm(hosts, guest)
    dom = lab.conn("lab-a").lookupByName(guest)
    errors = []

    def migrate():
        try:
            dom.migrateToURI3(
                lab.uri("lab-b"),
                {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 1},
                libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER,
            )
        except libvirt.libvirtError as exc:
            errors.append(exc.get_error_code())

    thread = threading.Thread(target=migrate)
    thread.start()
    try:
        deadline = time.monotonic() + 60  # a backstop: a loaded machine starts the job slowly
        while dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
            assert time.monotonic() < deadline, "the migration job never started"
            time.sleep(0.02)
        result = _by_id(_run(vm, hosts["lab-b"], "live"))["jobs"]
        assert result.status == "fail"
        assert "already running" in result.message
        assert "domjobabort" in result.remedy
        assert result.details["job_type"] != 0
    finally:
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass
        thread.join(60)
    assert errors == [libvirt.VIR_ERR_OPERATION_ABORTED]


def test_it_fails_while_a_block_job_copies_a_disk(lab, lab_guest, hosts):
    guest = lab_guest("pf-bjob", wait=False)
    vm = _vm(hosts, guest)
    dom = lab.conn("lab-a").lookupByName(guest)
    copy_path = labkit.local_dir("lab-a") / f"{guest}-copy.qcow2"
    target = f"<disk type='file'><source file='{labkit.LOCAL_IN_HOST}/{guest}-copy.qcow2'/><driver type='qcow2'/></disk>"
    dom.blockCopy(
        "vda",
        target,
        {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: 1024 * 1024},  # 1 MiB/s: still running while we check
        libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
    )
    try:
        result = _by_id(_run(vm, hosts["lab-b"], "live"))["jobs"]
        assert result.status == "fail"
        assert "block job" in result.message and "vda" in result.message
        assert "--abort" in result.remedy
        assert result.details["block_jobs"]["vda"]["end"] > 0
    finally:
        dom.blockJobAbort("vda", 0)
        copy_path.unlink(missing_ok=True)
    assert _by_id(_run(vm, hosts["lab-b"], "live"))["jobs"].status == "pass"


def test_it_predicts_no_convergence_under_a_tight_bandwidth_cap(lab, lab_guest, hosts):
    guest = lab_guest("pf-dirty", hot_mib=16, delay_ms=50)
    vm = _vm(hosts, guest)
    capped = _by_id(_run(vm, hosts["lab-b"], "live", {"bandwidth": 1}, measure_dirty_rate=True))["prediction"]
    assert capped.details["dirty_rate_mib_s"] > 1, capped.details
    assert capped.status == "fail" and capped.overridable
    assert "will not converge" in capped.message
    assert "auto-converge" in capped.remedy and "post-copy" in capped.remedy
    # Same measurement (reused), auto-converge on: a warning that says what it relies on.
    helped = _by_id(
        _run(vm, hosts["lab-b"], "live", {"bandwidth": 1, "auto_converge": True}, measure_dirty_rate=True)
    )["prediction"]
    assert helped.status == "warn" and "auto-converge" in helped.message
    postcopy = _by_id(
        _run(vm, hosts["lab-b"], "live", {"bandwidth": 1, "postcopy": True}, measure_dirty_rate=True)
    )
    assert postcopy["prediction"].status == "warn" and "post-copy" in postcopy["prediction"].message
    assert postcopy["plan"].status == "warn" and "the VM is lost" in postcopy["plan"].message
    free = _by_id(_run(vm, hosts["lab-b"], "live", measure_dirty_rate=True))["prediction"]
    assert free.status in ("pass", "warn") and free.details["converges"] is True


def test_it_reports_an_unreachable_target_without_hanging(lab, lab_guest, hosts):
    dead = services.do_register_host("pf-dead", "qemu+tcp://127.0.0.1:1/system", sync=False)
    guest = lab_guest("pf-dead", wait=False)
    vm = _vm(hosts, guest)
    t0 = time.monotonic()
    report = _run(vm, dead, "live")
    # A refused connection ends at once; a hang would run into the checklist's 20 s bound
    # (KVMWEB_PREFLIGHT_TIMEOUT). Generous below that: a loaded machine runs the rest slowly.
    assert time.monotonic() - t0 < 15
    results = _by_id(report)
    assert report.verdict == "fail"
    assert results["connection"].status == "fail"
    assert "Connection refused" in results["connection"].details["target"]["error"] or "refused" in (
        results["connection"].message
    )
    assert "libvirtd" in results["connection"].remedy
    assert results["vm_state"].status == "pass"  # the source side is still checked
    assert results["memory"].status == "skip" and results["collision"].status == "skip"

    ranked = rank_targets(vm, "live")
    assert [h.name for h, _r in ranked][:2] == ["lab-b", "pf-dead"]


def test_it_runs_from_the_command_line_with_exit_codes(lab, lab_guest, hosts, capsys):
    guest = lab_guest("pf-cli", wait=False)
    _vm(hosts, guest)
    call_command("preflight", str(guest), "lab-b", "--mode", "live", "--json", "--quick")
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "pass" and len(data["results"]) == len(registry.checks())
    assert {"id", "title", "status", "message", "remedy", "details", "overridable"} <= set(data["results"][0])

    with pytest.raises(SystemExit) as exc:
        call_command("preflight", str(guest), "lab-b", "--mode", "offline", "--quick")
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "Verdict: FAIL" in out and "[✗]" in out

    with pytest.raises(CommandError) as bad:
        call_command("preflight", str(guest), "lab-b", "--mode", "sideways")
    assert bad.value.returncode == 2
    with pytest.raises(CommandError) as unknown:
        call_command("preflight", "no-such-vm", "lab-b")
    assert unknown.value.returncode == 2


def test_it_renders_the_checklist_for_an_operator_and_hides_other_peoples_vms(
    lab, lab_guest, hosts, operator, alice, login
):
    # Booted and dirtying at its steady rate before the page measures it: a guest still
    # filling its 32 MiB at boot reads about 32 MiB/s, over half the 64 MiB/s cap (a
    # warning, not the "pass" asserted below) when its boot is slow.
    guest = lab_guest("pf-web", **labkit.QUIET)
    vm = _vm(hosts, guest)
    client = login(operator)
    url = f"/migrations/preflight/?vm={vm.pk}&target={hosts['lab-b'].pk}&mode=live&bandwidth=64"
    response = client.get(url, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="preflight-checklist"' in html and 'data-verdict="pass"' in html
    assert "--bandwidth 64" in html
    assert "<html" not in html  # the partial only
    page = client.get(url)
    assert page.status_code == 200 and "<html" in page.content.decode()
    # alice (self-service) does not own this VM: it does not exist for her.
    assert login(alice).get(url, HTTP_HX_REQUEST="true").status_code == 404


def _redefine(conn, name, edit):
    """Rewrite a shut-off guest's definition with edit(root) and define it again."""
    root = ET.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    edit(root)
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def test_it_warns_about_a_writeback_disk_cache_under_live_only(lab, lab_guest, hosts):
    guest = lab_guest("pf-cache", running=False)
    a = lab.conn("lab-a")
    _redefine(a, guest, lambda root: root.find("devices/disk/driver").set("cache", "writeback"))
    a.lookupByName(guest).create()
    vm = _vm(hosts, guest)
    live = _by_id(_run(vm, hosts["lab-b"], "live"))["disk_cache"]
    assert live.status == "warn"
    assert "vda: cache=writeback" in live.message and "cache='none'" in live.remedy
    assert _by_id(_run(vm, hosts["lab-b"], "cold"))["disk_cache"].status == "pass"


def test_it_fails_offline_without_the_uefi_variables_and_the_disk_secret_on_the_target(lab, lab_guest, hosts):
    guest = lab_guest("pf-fw", running=False)
    a, b = lab.conn("lab-a"), lab.conn("lab-b")
    usage = f"<usage type='volume'><volume>/kvmweb-test/{guest}</volume></usage>"
    secret = a.secretDefineXML(f"<secret ephemeral='no' private='yes'>{usage}</secret>")
    uuid = secret.UUIDString()
    nvram = f"/var/lib/libvirt/qemu/nvram/{guest}_VARS.fd"

    def edit(root):
        os_ = root.find("os")
        ET.SubElement(
            os_, "loader", {"readonly": "yes", "type": "pflash"}
        ).text = "/usr/share/OVMF/OVMF_CODE.fd"
        ET.SubElement(os_, "nvram").text = nvram
        encryption = ET.SubElement(root.find("devices/disk/source"), "encryption", {"format": "luks"})
        ET.SubElement(encryption, "secret", {"type": "passphrase", "uuid": uuid})
        ET.SubElement(root.find("devices"), "graphics", {"type": "vnc", "port": "-1", "listen": "192.0.2.10"})

    target_secret = None
    try:
        _redefine(a, guest, edit)
        vm = _vm(hosts, guest)
        results = _by_id(_run(vm, hosts["lab-b"], "offline"))
        firmware = results["firmware"]
        assert firmware.status == "fail" and nvram in firmware.message
        assert "does not copy" in firmware.message
        assert firmware.details["nvram_visible_on_target"] is False
        storage = results["storage"]
        assert storage.status == "fail" and f"Secret {uuid}" in storage.message
        assert "secret-define" in storage.remedy
        assert storage.details["secrets_on_target"] == {uuid: False}
        devices = results["devices"]
        assert devices.status == "warn" and "192.0.2.10" in devices.message

        target_secret = b.secretDefineXML(
            f"<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid>{usage}</secret>"
        )
        assert _by_id(_run(vm, hosts["lab-b"], "offline"))["storage"].status == "pass"
    finally:
        for s in (target_secret, secret):
            if s is not None:
                s.undefine()


def test_it_fails_a_vm_with_a_checkpoint(lab, lab_guest, hosts):
    guest = lab_guest("pf-ckpt", wait=False)
    dom = lab.conn("lab-a").lookupByName(guest)
    dom.checkpointCreateXML("<domaincheckpoint><name>backup-1</name></domaincheckpoint>", 0)
    try:
        vm = _vm(hosts, guest)
        result = _by_id(_run(vm, hosts["lab-b"], "live"))["snapshots"]
        assert result.status == "fail" and "checkpoint" in result.message
        assert result.details["checkpoints"] == ["backup-1"]
        assert "checkpoint-delete" in result.remedy
    finally:
        for cp in dom.listAllCheckpoints(0):
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def test_it_warns_when_no_storage_pool_lets_it_verify_a_disk(lab, lab_guest, hosts):
    guest = lab_guest("pf-nopool", running=False)
    sub = f"pf-sub-{secrets.token_hex(3)}"
    old, _inside = labkit.disk_path(guest, "shared", "lab-a")
    (labkit.shared_dir() / sub).mkdir()
    new = labkit.shared_dir() / sub / old.name
    old.rename(new)
    a = lab.conn("lab-a")
    try:
        path = f"{labkit.SHARED_IN_HOST}/{sub}/{old.name}"
        _redefine(a, guest, lambda root: root.find("devices/disk/source").set("file", path))
        a.lookupByName(guest).create()
        vm = _vm(hosts, guest)
        result = _by_id(_run(vm, hosts["lab-b"], "live"))["storage"]
        assert result.status == "warn" and "no libvirt storage pool" in result.message
        assert f"{labkit.SHARED_IN_HOST}/{sub}" in result.remedy and "pool-define-as" in result.remedy
    finally:
        _undefine(a, str(guest))
        new.unlink(missing_ok=True)
        (labkit.shared_dir() / sub).rmdir()


def test_it_fails_a_vm_that_left_its_source_behind_kvmweb_s_back(lab, lab_guest, hosts):
    guest = lab_guest("pf-gone", wait=False)
    vm = _vm(hosts, guest)
    _undefine(lab.conn("lab-a"), str(guest))
    results = _by_id(_run(vm, hosts["lab-b"], "live"))
    assert results["vm_state"].status == "fail"
    assert "not defined on lab-a" in results["vm_state"].message and "sync" in results["vm_state"].remedy
    assert results["jobs"].status == "skip" and results["connection"].status == "pass"


def test_it_lets_a_shut_off_host_model_vm_take_the_targets_cpu(lab, lab_guest, hosts):
    guest = lab_guest("pf-hm", running=False)

    def host_model(root):
        cpu = root.find("cpu")
        if cpu is not None:
            root.remove(cpu)
        ET.SubElement(root, "cpu", {"mode": "host-model", "check": "partial"})

    _redefine(lab.conn("lab-a"), guest, host_model)
    vm = _vm(hosts, guest)
    result = _by_id(_run(vm, hosts["lab-b"], "offline"))["cpu"]
    assert result.status == "pass" and "host-model" in result.message

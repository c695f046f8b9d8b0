"""Preflight without the lab: the report format, the convergence model, the test driver
(libvirt's own in-process hypervisor) and, only for what the lab cannot produce (a
different CPU vendor or machine, older QEMU/libvirt, same host UUID, host-passthrough on a
lesser CPU, PCI passthrough, an emulated TPM and a running UEFI guest, a missing bridge
(the lab hosts share one network namespace), Ceph, a full pool, a hung host), a fake
gateway with scripted host facts. Everything else is proven on the lab
(test_preflight_lab.py)."""

import copy
import time

import pytest
from django.utils import timezone

from hosts import hypervisor
from hosts.models import VM, Host
from migrations_app import preflight
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import CheckResult, Report, parse_guest, predict_precopy, run_preflight
from migrations_app.preflight.checks import prediction

MIB = 1024 * 1024

GUEST_XML = """<domain type='kvm'>
  <name>web1</name><uuid>11111111-2222-3333-4444-555555555501</uuid>
  <memory unit='KiB'>2097152</memory><vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>{os_extra}</os>
  {cpu}
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='{cache}'/>
      <source file='/srv/shared/web1.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    {devices}
  </devices>
</domain>"""
CUSTOM_CPU = "<cpu mode='custom' match='exact'><model fallback='forbid'>Skylake-Server</model><vendor>Intel</vendor></cpu>"


def guest_xml(cpu=CUSTOM_CPU, cache="none", devices="", os_extra=""):
    return GUEST_XML.format(cpu=cpu, cache=cache, devices=devices, os_extra=os_extra)


def host_facts(**over):
    facts = {
        "host_uuid": "aaaaaaaa-0000-0000-0000-000000000001",
        "hostname": "alpha.example",
        "arch": "x86_64",
        "cpu_vendor": "Intel",
        "cpu_model": "Skylake-Server",
        "cpus": 16,
        "memory_free": 32 * 1024 * MIB,
        "libvirt_version": 9_000_000,
        "hypervisor_version": 7_002_000,
        "hypervisor_type": "QEMU",
        "guests": {"x86_64": {"machines": ["pc-q35-7.2", "q35"], "domain_types": ["kvm", "qemu"]}},
    }
    facts.update(over)
    return facts


class FakeConn:
    """Scripted stand-in for hosts.hypervisor.HostConnection (the preflight queries)."""

    def __init__(self, script):
        self.s = script

    def close(self):
        pass

    def is_alive(self):
        return True

    def preflight_host(self):
        return self.s["host"]

    def preflight_domain(self, uuid):
        if "domain" not in self.s:
            raise hypervisor.DomainNotFound("no such VM")
        return self.s["domain"]

    def domain_capabilities(self, arch, machine, virttype, emulator=None):
        return self.s.get(
            "domcaps",
            {
                "path": "/usr/bin/qemu-system-x86_64",
                "machine": machine,
                "arch": arch,
                "vcpu_max": 288,
                "host_model_cpu": "<cpu mode='custom'><model>Skylake-Server</model></cpu>",
                "cpu_modes": ["host-passthrough", "host-model", "custom"],
            },
        )

    def compare_cpu(self, cpu_xml, arch, machine, virttype, emulator=None):
        return self.s.get("compare", {"result": "identical", "reason": ""})

    def max_vcpus(self, virttype):
        return 288

    def networks_status(self, names):
        return {n: self.s.get("networks", {}).get(n, {"exists": False, "active": False}) for n in names}

    def host_interfaces(self):
        return self.s.get("interfaces", [])

    def storage_lookup(self, paths):
        default = {
            "visible": True,
            "capacity": 10 * 1024 * MIB,
            "allocation": MIB,
            "pool": "shared",
            "dir_pool": None,
        }
        return {p: self.s.get("storage", {}).get(p, default) for p in paths}

    def secrets_present(self, uuids):
        return {u: u in self.s.get("secrets", []) for u in uuids}

    def probe_shared(self, target, directories):
        return {d: target.s.get("shared", {}).get(d, True) for d in directories}

    def domain_collisions(self, uuid, name):
        return self.s.get("collisions", {"by_uuid": None, "by_name": None})

    def measure_dirty_rate(self, uuid, seconds=1, mode="page-sampling"):
        self.s["measured"] = self.s.get("measured", 0) + 1
        time.sleep(self.s.get("measure_seconds", 0))
        return {"mib_per_s": self.s.get("dirty", 5), "mode": mode, "period": seconds}


def domain_facts(xml=None, **over):
    facts = {
        "uuid": "11111111-2222-3333-4444-555555555501",
        "name": "web1",
        "state": "running",
        "state_reason": "booted",
        "active": True,
        "persistent": True,
        "xml": xml or guest_xml(),
        "job_type": 0,
        "block_jobs": {},
        "snapshots": [],
        "checkpoints": [],
        "managed_save": False,
        "memory": 2048 * MIB,
        "rss": 1024 * MIB,
        "disk_sizes": {"vda": {"capacity": 10 * 1024 * MIB, "allocation": MIB, "physical": MIB}},
    }
    facts.update(over)
    return facts


@pytest.fixture
def fake(monkeypatch, db):
    """fake(source=..., target=...) -> run(mode, **options) with scripted hosts."""
    prediction._dirty_cache.clear()
    a = Host.objects.create(name="alpha", uri="qemu+tcp://10.0.0.1/system")
    b = Host.objects.create(name="beta", uri="qemu+tcp://10.0.0.2/system")
    vm = VM.objects.create(uuid="11111111-2222-3333-4444-555555555501", name="web1", host=a, state=VM.RUNNING)
    scripts = {
        a.uri: {"host": host_facts(), "domain": domain_facts()},
        b.uri: {
            "host": host_facts(host_uuid="bbbbbbbb-0000-0000-0000-000000000002", hostname="beta.example")
        },
    }

    def connect(uri, timeout=None, call_timeout=None):
        if scripts.get(uri, {}).get("down"):
            raise hypervisor.HypervisorError(
                f"Cannot reach libvirtd at {uri}: connection refused.", remedy="Start it."
            )
        return FakeConn(scripts[uri])

    monkeypatch.setattr(hypervisor, "connect", connect)

    def run(mode="live", source=None, target=None, **options):
        scripts[a.uri].update(copy.deepcopy(source or {}))
        scripts[b.uri].update(copy.deepcopy(target or {}))
        plan = MigrationPlan(vm=vm, source=a, target=b, mode=mode, options=options)
        return {r.id: r for r in run_preflight(plan).results}

    run.vm, run.a, run.b, run.scripts = vm, a, b, scripts
    return run


# ----------------------------------------------------------------------------- report


def test_it_round_trips_a_report_and_lists_what_blocks_it():
    results = [
        CheckResult("cpu", "CPU", "pass", "ok"),
        CheckResult("memory", "Memory", "fail", "too small", "free memory", {"free": 1}, overridable=True),
        CheckResult("storage", "Storage", "fail", "local disk", "copy it", {}, overridable=False),
        CheckResult("cache", "Cache", "warn", "writeback", "cache=none"),
    ]
    report = Report(results, Report.verdict_of(results), "2026-01-01T00:00:00+00:00", 12, {"mode": "live"})
    assert report.verdict == "fail"
    again = Report.from_dict(report.to_dict())
    assert again.to_dict() == report.to_dict()
    assert again.counts == {"pass": 1, "warn": 1, "fail": 2, "skip": 0}
    assert [r.id for r in again.fails] == ["memory", "storage"] and [r.id for r in again.warnings] == [
        "cache"
    ]
    reasons = report.blocking_reasons(acknowledged_ids=[], overridden_ids=[])
    assert len(reasons) == 3
    # Overriding a non-overridable fail does nothing; acknowledging the warning clears it.
    reasons = report.blocking_reasons(acknowledged_ids=["cache"], overridden_ids=["memory", "storage"])
    assert reasons == ["Storage: local disk"]
    assert Report.verdict_of([CheckResult("x", "X", "skip", "")]) == "pass"


def test_it_models_precopy_convergence():
    # 1 GiB at 100 MiB/s, nothing dirtied: one pass of ~10 s.
    idle = predict_precopy(1024 * MIB, 100 * MIB, 0, 0.3)
    assert idle["converges"] and idle["iterations"] == 1 and 10.2 < idle["seconds"] < 10.3
    # Dirty at 20 % of the bandwidth: a few passes, downtime under the limit.
    busy = predict_precopy(1024 * MIB, 100 * MIB, 20 * MIB, 0.3)
    assert busy["converges"] and busy["iterations"] > 1 and busy["downtime_ms"] <= 320
    assert busy["seconds"] > idle["seconds"]
    # Dirtying as fast as it can be sent: never converges.
    assert predict_precopy(1024 * MIB, 100 * MIB, 100 * MIB, 0.3)["converges"] is False


def test_it_reads_the_facts_that_matter_from_domain_xml():
    xml = guest_xml(
        cpu="<cpu mode='host-passthrough'><feature policy='require' name='invtsc'/></cpu>",
        cache="writeback",
        os_extra="<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
        devices="""<interface type='network'><source network='prod'/></interface>
        <interface type='bridge'><source bridge='br0'/></interface>
        <hostdev mode='subsystem' type='pci'><source><address bus='0x03'/></source></hostdev>
        <filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='share'/></filesystem>
        <shmem name='ivsh'><model type='ivshmem-plain'/></shmem>
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/><readonly/></disk>""",
    )
    g = parse_guest(xml)
    assert (g["arch"], g["machine"], g["virttype"], g["vcpu_max"]) == ("x86_64", "pc-q35-7.2", "kvm", 2)
    assert g["cpu_mode"] == "host-passthrough" and g["invtsc_without_frequency"] is True
    assert g["disks"][0]["cache"] == "writeback" and g["disks"][1]["readonly"] is True
    assert [i["network"] or i["bridge"] for i in g["interfaces"]] == ["prod", "br0"]
    assert g["hostdevs"] == [{"mode": "subsystem", "type": "pci"}]
    assert g["virtiofs"] == ["share"] and g["shmem"] == ["ivsh"]
    assert g["nvram"] == "/var/lib/libvirt/qemu/nvram/web1_VARS.fd"
    assert g["tpms"] == [{"model": "tpm-crb", "backend": "emulator"}]


# ------------------------------------------------------------------------- test driver


def test_it_never_raises_against_the_test_driver_and_says_what_it_could_not_check(db, node_xml):
    a = Host.objects.create(name="t-a", uri=f"test://{node_xml('a')}")
    b = Host.objects.create(name="t-b", uri=f"test://{node_xml('b')}")
    vm = VM.objects.create(uuid="11111111-2222-3333-4444-555555555501", name="web1", host=a, state=VM.RUNNING)
    report = run_preflight(MigrationPlan(vm=vm, source=a, target=b, mode="live"))
    results = {r.id: r for r in report.results}
    assert len(results) == len(preflight.registry.checks()) == 21  # migration_ports made it 21
    # test:// hosts have no network address: the port probe says so instead of guessing.
    assert results["migration_ports"].status == "skip"
    assert results["connection"].status == "pass"
    assert results["vm_state"].status == "pass"
    # The test driver cannot report jobs: said, not assumed.
    assert results["jobs"].status == "warn" and "could not say" in results["jobs"].message
    # web1 exists in both node files: a same-UUID VM already runs on the "target".
    assert results["collision"].status == "fail"
    assert results["networks"].status == "pass"  # network "default" is active in both
    assert "could not be measured" in results["prediction"].details["dirty_rate_source"]
    assert report.verdict == "fail"


def test_it_takes_the_source_facts_a_run_moments_before_read_and_hands_them_on(db, node_xml, monkeypatch):
    """A second look at the same plan (runner.after_landing: free memory and names on the
    target once a VM landed there) takes the VM's facts from the run before instead of
    reading them again; the target's facts are read afresh."""
    a = Host.objects.create(name="t-a", uri=f"test://{node_xml('a')}")
    b = Host.objects.create(name="t-b", uri=f"test://{node_xml('b')}")
    vm = VM.objects.create(uuid="11111111-2222-3333-4444-555555555501", name="web1", host=a, state=VM.RUNNING)
    plan = MigrationPlan(vm=vm, source=a, target=b, mode="live")
    first = run_preflight(plan, measure_dirty_rate=False)
    assert set(first.facts) == {"domain", "guest"} and first.facts["domain"]["memory"] > 0
    assert "facts" not in first.to_dict()
    read, hosts = [], []
    real_domain, real_host = (
        hypervisor.HostConnection.preflight_domain,
        hypervisor.HostConnection.preflight_host,
    )
    monkeypatch.setattr(
        hypervisor.HostConnection,
        "preflight_domain",
        lambda self, uuid: read.append(uuid) or real_domain(self, uuid),
    )
    monkeypatch.setattr(
        hypervisor.HostConnection, "preflight_host", lambda self: hosts.append(self.uri) or real_host(self)
    )
    reuse = {r.id: r for r in first.results if r.id not in ("memory", "collision")}
    again = run_preflight(plan, measure_dirty_rate=False, reuse=reuse, known=first.facts)
    assert read == [] and hosts == [b.uri]
    memory = {r.id: r for r in again.results}["memory"]
    assert memory.details["guest_memory_mib"] == first.facts["domain"]["memory"] // MIB
    assert sorted(again.reused) == sorted(reuse)


def test_it_fails_connection_and_skips_the_rest_for_an_unreachable_source(fake):
    results = fake("live", source={"down": True})
    assert results["connection"].status == "fail"
    assert (
        "connection refused" in results["connection"].message and results["connection"].remedy == "Start it."
    )
    assert results["vm_state"].status == "skip" and results["cpu"].status == "skip"


# ---------------------------------------------------------------- fake gateway cases


def test_it_passes_a_healthy_scripted_pair(fake):
    results = fake("live")
    assert {r.status for r in results.values()} == {"pass"}, {
        k: r.message for k, r in results.items() if r.status != "pass"
    }


def test_it_fails_a_target_with_a_different_cpu_vendor(fake):
    results = fake(
        "live",
        target={
            "host": host_facts(host_uuid="b2", cpu_vendor="AMD", cpu_model="EPYC"),
            "compare": {
                "result": "incompatible",
                "reason": "Host CPU does not provide required features: avx512f, pku",
            },
        },
    )
    cpu = results["cpu"]
    assert cpu.status == "fail" and not cpu.overridable
    assert "avx512f" in cpu.message and "hypervisor-cpu-baseline" in cpu.remedy
    assert cpu.details["vendor_mismatch"] is True


def test_it_warns_about_host_passthrough_and_fails_it_on_a_lesser_cpu(fake):
    xml = guest_xml(cpu="<cpu mode='host-passthrough' check='none'/>")
    warn = fake("live", source={"domain": domain_facts(xml)})["cpu"]
    assert warn.status == "warn" and "host-passthrough" in warn.message
    fail = fake(
        "live",
        source={"domain": domain_facts(xml)},
        target={"compare": {"result": "incompatible", "reason": "missing features: amx"}},
    )["cpu"]
    assert fail.status == "fail" and "amx" in fail.message


def test_it_fails_an_older_qemu_and_warns_about_an_older_libvirt(fake):
    old_qemu = fake("live", target={"host": host_facts(host_uuid="b2", hypervisor_version=6_002_000)})[
        "versions"
    ]
    assert old_qemu.status == "fail" and old_qemu.overridable and "6.2.0" in old_qemu.message
    old_libvirt = fake("live", target={"host": host_facts(host_uuid="b2", libvirt_version=8_000_000)})[
        "versions"
    ]
    assert old_libvirt.status == "warn" and "8.0.0" in old_libvirt.message


def test_it_fails_the_same_host_by_uuid_even_under_another_name(fake):
    result = fake("live", target={"host": host_facts(hostname="other-name")})["same_host"]
    assert result.status == "fail" and "host_uuid" in result.remedy


def test_it_fails_an_unsupported_machine_type_and_too_many_vcpus(fake):
    results = fake(
        "live",
        target={
            "host": host_facts(
                host_uuid="b2", guests={"x86_64": {"machines": ["pc"], "domain_types": ["qemu"]}}
            ),
        },
    )
    assert results["machine"].status == "fail" and "kvm" in results["machine"].message
    many = fake(
        "live",
        target={
            "host": host_facts(host_uuid="b2"),
            "domcaps": {
                "path": "",
                "machine": "q35",
                "arch": "x86_64",
                "vcpu_max": 1,
                "host_model_cpu": "",
                "cpu_modes": [],
            },
        },
    )["vcpus"]
    assert many.status == "fail" and "at most 1" in many.message


def test_it_fails_passthrough_devices_live_and_warns_for_cold(fake):
    xml = guest_xml(
        devices="<hostdev mode='subsystem' type='pci'><source><address bus='0x03'/></source></hostdev>"
    )
    live = fake("live", source={"domain": domain_facts(xml)})["devices"]
    assert live.status == "fail" and "host device" in live.message and "detach-device" in live.remedy
    cold = fake("cold", source={"domain": domain_facts(xml)})["devices"]
    assert cold.status == "warn"


def test_it_flags_tpm_state_and_uefi_variables_the_lab_cannot_run(fake):
    # The lab has neither swtpm nor OVMF: a running UEFI guest and an emulated TPM are scripted.
    nvram = "/var/lib/libvirt/qemu/nvram/web1_VARS.fd"
    tpm = "<tpm model='tpm-crb'><backend type='emulator'/></tpm>"
    invisible = {"visible": False, "capacity": None, "allocation": None, "pool": None, "dir_pool": None}
    off = domain_facts(guest_xml(devices=tpm), state="shutoff", active=False, rss=None)
    cold = fake("cold", source={"domain": off})["firmware"]
    assert cold.status == "warn" and "swtpm" in cold.message
    running = domain_facts(guest_xml(os_extra=f"<nvram>{nvram}</nvram>", devices=tpm))
    live = fake("live", source={"domain": running}, target={"storage": {nvram: invisible}})["firmware"]
    assert live.status == "warn" and "re-creates it from the template" in live.message
    assert "travels with the migration stream" not in live.message  # warnings first, notes only on pass
    ok = fake("live", source={"domain": domain_facts(guest_xml(devices=tpm))})["firmware"]
    assert ok.status == "pass" and "travels with the migration stream" in ok.message


def test_it_fails_a_missing_bridge_on_the_target(fake):
    xml = guest_xml(devices="<interface type='bridge'><source bridge='br-prod'/></interface>")
    result = fake("live", source={"domain": domain_facts(xml)}, target={"interfaces": ["eth0", "lo"]})[
        "networks"
    ]
    assert result.status == "fail" and "br-prod" in result.message
    ok = fake("live", source={"domain": domain_facts(xml)}, target={"interfaces": ["br-prod"]})["networks"]
    assert ok.status == "pass"


def test_it_fails_a_storage_copy_that_does_not_fit_the_target_pool(fake):
    path = "/srv/shared/web1.qcow2"
    small = {
        "visible": False,
        "capacity": None,
        "allocation": None,
        "pool": None,
        "dir_pool": {"name": "local", "active": True, "capacity": 10 * MIB, "available": 100 * 1024},
    }
    sizes = {"vda": {"capacity": 10 * 1024 * MIB, "allocation": 5 * 1024 * MIB, "physical": 5 * 1024 * MIB}}
    result = fake(
        "live-copy", source={"domain": domain_facts(disk_sizes=sizes)}, target={"storage": {path: small}}
    )["storage"]
    assert result.status == "fail" and "Pool local on beta" in result.message and "5120 MiB" in result.message


def test_it_runs_checks_concurrently_and_bounds_a_hung_host(fake, monkeypatch, settings):
    settings.PREFLIGHT_TIMEOUT = 1.0
    slow = FakeConn.compare_cpu

    def hang(self, *args, **kwargs):
        time.sleep(3)
        return slow(self, *args, **kwargs)

    monkeypatch.setattr(FakeConn, "compare_cpu", hang)
    t0 = time.monotonic()
    results = fake("live")
    assert time.monotonic() - t0 < 2.5
    assert results["cpu"].status == "fail" and "did not finish" in results["cpu"].message
    assert results["memory"].status == "pass"  # the others were not held up


def test_it_gives_the_dry_run_page_to_operators_only(fake, login, operator, auditor, alice):
    url = f"/migrations/preflight/?vm={fake.vm.pk}&target={fake.b.pk}&mode=live"
    page = login(operator).get(url)
    assert page.status_code == 200
    assert b"Preflight checklist" in page.content and b'name="ack"' not in page.content
    assert login(auditor).get(url).status_code == 403  # sees the VM, may not migrate
    assert login(alice).get(url).status_code == 404  # not her VM
    form = login(operator).get("/migrations/preflight/")
    assert form.status_code == 200 and b"web1" in form.content


def test_it_renders_ack_inputs_for_warnings_and_override_for_admins(fake, login, operator, admin):
    url = f"/migrations/preflight/?vm={fake.vm.pk}&target={fake.b.pk}&mode=live&postcopy=1"
    html = login(operator).get(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'name="ack" value="plan"' in html and "<html" not in html
    assert "--postcopy" in html
    # The dry-run page's own re-run shows no inputs.
    html = login(operator).get(url + "&dry_run=1", HTTP_HX_REQUEST="true").content.decode()
    assert 'name="ack"' not in html and "dry_run=1" in html
    # An overridable fail (too little memory): only an administrator gets the override box.
    fake.scripts[fake.b.uri]["host"] = host_facts(host_uuid="b2", memory_free=512 * MIB)
    url = f"/migrations/preflight/?vm={fake.vm.pk}&target={fake.b.pk}&mode=live"
    html = login(operator).get(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-verdict="fail"' in html and 'name="override"' not in html
    html = login(admin).get(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'name="override" value="memory"' in html


def test_it_ranks_ready_targets_first(fake):
    # Ranking reads stored facts (tests/migrations_app/test_ranking.py has the fleet-size
    # proof); the scripted hosts below answer only the dirty-rate measurement it starts.
    now = timezone.now()
    reachable = dict(status=Host.REACHABLE, last_probe_at=now, last_seen_at=now)
    VM.objects.filter(pk=fake.vm.pk).update(memory=2048 * MIB)
    fake.vm.refresh_from_db()
    Host.objects.filter(pk=fake.b.pk).update(memory_free=512 * MIB, **reachable)
    Host.objects.create(name="gamma", uri="qemu+tcp://10.0.0.3/system", status=Host.UNREACHABLE)
    Host.objects.create(name="delta", uri="qemu+tcp://10.0.0.4/system", memory_free=8192 * MIB, **reachable)
    ranked = preflight.rank_targets(fake.vm, "live")
    # delta is ready; beta lacks memory (one fail); gamma was unreachable at its last probe.
    assert [h.name for h, _r in ranked] == ["delta", "beta", "gamma"]
    assert ranked[0][1].verdict == "pass", [(r.id, r.message) for r in ranked[0][1].warnings]
    assert [r.id for r in ranked[1][1].fails] == ["memory"]
    # Ranking started the dirty-rate measurement for the full run that follows.
    deadline = time.monotonic() + 2
    while fake.scripts[fake.a.uri].get("measured", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.scripts[fake.a.uri]["measured"] == 1
    assert fake("live")["prediction"].details["dirty_rate"]["mib_per_s"] == 5
    assert fake.scripts[fake.a.uri]["measured"] == 1


def test_it_reuses_a_dirty_rate_measurement_primed_when_the_vm_was_chosen(fake):
    source = fake.scripts[fake.a.uri]
    source["measure_seconds"] = 0.3
    thread = preflight.prime_dirty_rate(fake.vm)
    assert thread is not None
    first = fake("live")["prediction"]  # starts while the primed measurement runs: waits for it
    second = fake("live")["prediction"]
    thread.join(2)
    assert source["measured"] == 1
    assert first.details["dirty_rate_mib_s"] == second.details["dirty_rate_mib_s"] == 5
    fake.vm.state = VM.SHUTOFF
    assert preflight.prime_dirty_rate(fake.vm) is None


def test_it_checks_the_secret_of_a_network_disk(fake):
    # An RBD disk (no Ceph in the lab): reachable from any host, but its secret must be there.
    secret = "5f1c1c39-0000-4000-8000-00000000abcd"
    xml = guest_xml(
        devices=f"""<disk type='network' device='disk'><source protocol='rbd' name='pool/web1'>
          <host name='ceph1'/></source><auth username='libvirt'><secret type='ceph' uuid='{secret}'/></auth>
          <target dev='vdb' bus='virtio'/></disk>"""
    )
    results = fake("live", source={"domain": domain_facts(xml)})
    assert results["storage"].status == "fail" and secret in results["storage"].message
    assert "secret-define" in results["storage"].remedy
    ok = fake("live", source={"domain": domain_facts(xml)}, target={"secrets": [secret]})["storage"]
    assert ok.status == "pass" and "rbd" in ok.message


def test_it_answers_in_the_callers_language_from_its_worker_threads(fake, monkeypatch):
    from django.utils import translation

    seen = []
    real = FakeConn.compare_cpu

    def spy(self, *args, **kwargs):
        seen.append(translation.get_language())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FakeConn, "compare_cpu", spy)
    with translation.override("zh-hans"):
        fake("live")
    assert seen and set(seen) == {"zh-hans"}


def test_it_judges_a_plan_with_a_convergence_ladder_at_the_ladders_top_step(fake):
    # 64 MiB to send at a 100 MiB/s cap while the guest dirties 200 MiB/s: what remains
    # after each pass (64 MiB) needs about 640 ms of downtime.
    small = {"domain": domain_facts(rss=64 * MIB), "dirty": 200}
    plain = fake("live", source=small, bandwidth=100)["prediction"]
    assert plain.status == "fail" and "will not converge" in plain.message
    # The ladder raises the allowed downtime up to 1,000 ms: it converges there, a warning.
    laddered = fake("live", bandwidth=100, convergence_policy="ladder", ladder_max_downtime=1000)[
        "prediction"
    ]
    assert laddered.status == "warn", laddered.message
    assert "up to 1000 ms" in laddered.message and laddered.details["ladder_top_downtime_ms"] == 1000
    assert 600 <= laddered.details["estimated_downtime_ms"] <= 1000
    # A ladder that stops below what is needed and then aborts: a fail that says so.
    short = fake("live", bandwidth=100, convergence_policy="ladder-abort", ladder_max_downtime=500)[
        "prediction"
    ]
    assert short.status == "fail" and "ladder will abort it" in short.message


def test_it_warns_instead_of_refusing_when_one_sampling_step_decides_convergence(fake):
    # 64 MiB to send at a 4 MiB/s cap. Page sampling reads in 2 MiB/s steps: a reading of
    # 4 MiB/s may be 2 MiB/s, where the plan converges; a warning that says so.
    small = {"domain": domain_facts(rss=64 * MIB), "dirty": 4}
    borderline = fake("live", source=small, bandwidth=4)["prediction"]
    assert borderline.status == "warn", borderline.message
    assert "steps of 2 MiB/s" in borderline.message and "at 2 MiB/s it would" in borderline.message
    assert borderline.details["dirty_rate_step_mib_s"] == 2
    # The same reading at a 2 MiB/s cap: one step lower still does not converge, a refusal.
    fast = fake("live", bandwidth=2)["prediction"]
    assert fast.status == "fail" and "will not converge" in fast.message

"""The preflight check migration_ports on the KVM lab: measured on the source host over
SSH (kvmweb's key), the target's migration ports answer; when a firewall drops them the
check fails with its remedy and nothing moves.

The lab hosts share one network namespace (loopback addresses 127.0.0.N, lab/README.md),
so the firewall rule is a DROP in this machine's INPUT chain for lab-b's address and only
the two ports the check probes (the middle and the top of lab-b's range: libvirt hands
out the lowest ports first, so other sessions' migrations to lab-b are not touched). It
is removed at the end whatever happens."""

import shutil
import subprocess
import time

import pytest

import lab as labkit
from hosts import reach, transport
from hosts import services as host_services
from hosts.models import VM, Host
from migrations_app.models import MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight

pytestmark = pytest.mark.lab


def _register_over_ssh(hosts, admin):
    out = {}
    for h in hosts:
        uri = transport.build_uri("ssh", labkit.ip(h))
        host_services.do_confirm_host_key(uri, transport._fingerprint(labkit.ssh_host_key(h)), actor=admin)
        out[h] = host_services.do_register_host(h, uri, sync=False, actor=admin)
    return out


def _iptables(*args):
    subprocess.run(["iptables", "-w", "5", *args], check=True, capture_output=True, timeout=30)


def _check(guest, target):
    vm = VM.objects.get(uuid=guest.uuid)
    t0 = time.monotonic()
    report = run_preflight(MigrationPlan(vm, vm.host, target, "live", {}), measure_dirty_rate=False)
    return {r.id: r for r in report.results}, time.monotonic() - t0


def test_it_measures_the_migration_ports_on_the_source_and_names_a_firewall_that_drops_them(
    ssh_lab, lab_guest, admin, settings
):
    if not shutil.which("iptables"):
        pytest.skip("iptables is not installed: the lab cannot play the firewall")
    settings.PORT_PROBE_CACHE_SECONDS = 0  # measure every time
    hosts = _register_over_ssh(ssh_lab.hosts, admin)
    lo, hi = labkit.migration_ports("lab-b")  # what lab-b's qemu.conf sets
    host_services.do_update_host(
        hosts["lab-b"],
        name="lab-b",
        uri=hosts["lab-b"].uri,
        migration_port_min=lo,
        migration_port_max=hi,
        actor=admin,
    )
    target = Host.objects.get(name="lab-b")
    guest = lab_guest("ports")
    assert not host_services.do_sync_inventory(hosts["lab-a"])["error"]
    probed = reach.sample_ports(lo, hi)
    assert lo not in probed and hi in probed

    results, took = _check(guest, target)
    check = results["migration_ports"]
    assert check.status == "pass", check.message
    # The same SSH session asked lab-a to open lab-b's URI, as its libvirtd will peer to peer.
    p2p = results["transport"]
    assert p2p.status == "pass" and p2p.details["p2p_verified"] is True, p2p.message
    assert p2p.details["p2p_said"] == "lab-b.lab.test" and "Verified on lab-a" in p2p.message
    print(f"migration_ports: reachable run {took:.2f} s, probe {check.details['elapsed_ms']} ms")
    assert check.details["vantage"] == reach.SOURCE and check.details["address"] == labkit.ip("lab-b")
    states = {p["port"]: p["state"] for p in check.details["ports"]}
    assert {states[p] for p in probed} <= set(reach.REACHABLE) and states[22] == reach.OPEN  # lab-b's sshd
    assert "measured on lab-a over SSH" in check.message and f"{lo}-{hi}" in check.message

    rules = [
        ["-d", labkit.ip("lab-b"), "-p", "tcp", "--syn", "--dport", str(p), "-j", "DROP"] for p in probed
    ]
    try:
        for rule in rules:
            _iptables("-I", "INPUT", "1", *rule)
        results, took = _check(guest, target)
        check = results["migration_ports"]
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-w", "5", "-D", "INPUT", *rule], capture_output=True, timeout=30)
    assert check.status == "fail" and check.overridable, check.message
    states = {p["port"]: p["state"] for p in check.details["ports"]}
    assert all(states[p] == reach.FILTERED for p in probed) and states[22] == reach.OPEN
    assert "measured on lab-a over SSH" in check.message and "firewall" in check.message
    assert (
        f"firewall-cmd --permanent --add-port={lo}-{hi}/tcp" in check.remedy and "Tunnelled" in check.remedy
    )
    # Bounded: one probe timeout (KVMWEB_PORT_PROBE_TIMEOUT, 1 s) plus the SSH login.
    assert check.details["elapsed_ms"] < 1000 * (settings.PORT_PROBE_TIMEOUT + 10), check.details
    print(f"migration_ports: filtered run {took:.2f} s, probe {check.details['elapsed_ms']} ms")
    # Nothing changed: no job, the guest where it was.
    assert not MigrationJob.objects.exists() and labkit.where(guest) == {"lab-a": "running"}
    # Tunnelled needs no port: the same hosts pass without probing.
    vm = VM.objects.get(uuid=guest.uuid)
    report = run_preflight(
        MigrationPlan(vm, vm.host, target, "live", {"tunnelled": True}), measure_dirty_rate=False
    )
    assert {r.id: r for r in report.results}["migration_ports"].status == "pass"

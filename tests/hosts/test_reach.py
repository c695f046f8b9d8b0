"""Migration port reachability without the lab (hosts/reach.py and the preflight check
migration_ports): real sockets on this machine for kvmweb's own probe, the source probe's
output read from a scripted ssh, the check's verdicts from scripted measurements, and the
port range an administrator enters on the host's Edit page. The SSH probe on a real source
and a firewall dropping the ports are proved on the lab (test_reach_lab.py)."""

import socket
import subprocess
from types import SimpleNamespace

import pytest
from django.urls import reverse
from django.utils import translation

from hosts import reach
from hosts.models import Host
from kvmweb.audit.models import AuditEvent
from migrations_app.preflight.checks.network import check_migration_ports, check_transport
from migrations_app.preflight.context import Unavailable

SSH_URI = "qemu+libssh2://root@10.0.0.1/system?keyfile=/k/id&known_hosts=/k/known_hosts"


@pytest.fixture
def listening():
    """A port on 127.0.0.1 that listens, and one that does not (bound, never listening)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # held, so nobody else listens on it during the test
    yield server.getsockname()[1], closed.getsockname()[1]
    server.close()
    closed.close()


def test_it_tells_an_open_port_from_a_closed_one_from_kvmweb(listening):
    open_port, closed_port = listening
    found = reach.probe_from_here("127.0.0.1", [open_port, closed_port], timeout=5)
    assert [(p.port, p.state) for p in found] == [(open_port, reach.OPEN), (closed_port, reach.CLOSED)]


def test_it_probes_the_middle_and_top_of_a_range_never_its_lowest_port():
    assert reach.sample_ports(49152, 49215) == [49183, 49215]
    assert reach.sample_ports(50000, 50000) == [50000]
    assert reach.sample_ports(50000, 50001) == [50001]  # the "middle" of two is the lowest
    assert reach.sample_ports(50000, 50002) == [50001, 50002]
    assert reach.port_range(Host(name="x", uri="test:///default")) == (49152, 49215)
    assert reach.port_range(Host(migration_port_min=50000, migration_port_max=50010)) == (50000, 50010)


def _scripted_ssh(monkeypatch, stdout, stderr="", returncode=0):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"], seen["input"] = cmd, kwargs.get("input")
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    monkeypatch.setattr(reach.subprocess, "run", run)
    return seen


def test_it_reads_each_port_state_from_the_probe_run_on_the_source(monkeypatch):
    out = (
        "kvmweb-probe 49183 1 bash: connect: Connection refused\n"
        "kvmweb-probe 49215 124 \n"
        "kvmweb-probe 16509 1 bash: connect: No route to host\n"
        "kvmweb-probe 22 0 \n"
    )
    seen = _scripted_ssh(monkeypatch, out)
    found, p2p = reach.probe_from_source(SSH_URI, "10.0.0.2", [49183, 49215, 16509, 22], timeout=1)
    assert [p.state for p in found] == [reach.CLOSED, reach.FILTERED, reach.REJECTED, reach.OPEN]
    assert p2p is None
    cmd = seen["cmd"]
    # The URI's key and known_hosts only, batch mode, confirmed host keys; the script on stdin.
    assert ["-i", "/k/id"] == cmd[cmd.index("-i") : cmd.index("-i") + 2]
    assert "UserKnownHostsFile=/k/known_hosts" in cmd and "BatchMode=yes" in cmd
    assert "StrictHostKeyChecking=yes" in cmd and cmd[-2:] == [
        "10.0.0.1",
        "bash -s -- 10.0.0.2 1 - 49183 49215 16509 22",
    ]
    assert "/dev/tcp" in seen["input"]


def test_it_asks_the_source_to_open_the_target_uri_as_its_libvirtd_will(monkeypatch):
    target_uri = "qemu+libssh2://root@10.0.0.2/system?keyfile=/k/id&known_hosts=/k/known_hosts"
    seen = _scripted_ssh(monkeypatch, "kvmweb-p2p 0 beta.example\nkvmweb-probe 22 0 \n")
    states, p2p = reach.probe_from_source(SSH_URI, "10.0.0.2", [22], timeout=1, p2p_uri=target_uri)
    assert p2p == {"uri": target_uri, "ok": True, "said": "beta.example", "user": "root"}
    assert "'" + target_uri + "'" in seen["cmd"][-1] and "virsh -q -c" in seen["input"]
    said = "error: failed to connect to the hypervisor error: SSH HOST KEY VERIFICATION FAILED"
    _scripted_ssh(monkeypatch, f"kvmweb-p2p 1 {said}\nkvmweb-probe 22 0 \n")
    _states, p2p = reach.probe_from_source(SSH_URI, "10.0.0.2", [22], timeout=1, p2p_uri=target_uri)
    assert p2p["ok"] is False and p2p["said"] == said


def test_it_says_why_the_probe_could_not_run_on_the_source(monkeypatch):
    _scripted_ssh(monkeypatch, "", "root@10.0.0.1: Permission denied (publickey).", 255)
    with pytest.raises(reach.ProbeError, match="Permission denied"):
        reach.probe_from_source(SSH_URI, "10.0.0.2", [49215], timeout=1)
    _scripted_ssh(
        monkeypatch, "kvmweb-probe 49215 1 bash: /dev/tcp/10.0.0.2/49215: No such file or directory\n"
    )
    with pytest.raises(reach.ProbeError, match="/dev/tcp"):
        reach.probe_from_source(SSH_URI, "10.0.0.2", [49215], timeout=1)


def test_it_measures_from_kvmweb_when_the_source_is_not_ssh_and_says_so(
    real_port_probes, listening, settings, monkeypatch
):
    open_port, closed_port = listening
    source = Host(name="src", uri="qemu+tls://10.0.0.1/system")
    found = reach.measure(source, "127.0.0.1", [open_port, closed_port], timeout=5)
    assert found.vantage == reach.KVMWEB and "src is not reached over SSH" in found.fallback
    assert not found.filtered and not found.cached
    again = reach.measure(source, "127.0.0.1", [open_port, closed_port], timeout=5)
    assert again.cached and [p.state for p in again.ports] == [p.state for p in found.ports]
    settings.PORT_PROBE_CACHE_SECONDS = 0
    assert not reach.measure(source, "127.0.0.1", [open_port], timeout=5).cached
    settings.PORT_PROBE_CACHE_SECONDS = 300
    # A failure is not reused: the next checklist after a fix measures again.
    monkeypatch.setattr(
        reach, "probe_from_here", lambda a, ports, t: [reach.PortState(p, reach.FILTERED) for p in ports]
    )
    assert reach.measure(source, "127.0.0.1", [closed_port], timeout=5).filtered
    assert not reach.measure(source, "127.0.0.1", [closed_port], timeout=5).cached


def test_it_falls_back_to_kvmweb_when_the_ssh_probe_fails_and_says_why(
    real_port_probes, monkeypatch, listening
):
    _scripted_ssh(monkeypatch, "", "ssh: connect to host 10.0.0.1 port 22: Connection refused", 255)
    monkeypatch.setattr(
        reach, "probe_from_here", lambda a, ports, t: [reach.PortState(p, reach.CLOSED) for p in ports]
    )
    found = reach.measure(Host(name="src", uri=SSH_URI), "127.0.0.1", [49215], timeout=1)
    assert found.vantage == reach.KVMWEB and "Connection refused" in found.fallback


def _ctx(measured, *, options=None, live=True, target_uri="qemu+tcp://10.0.0.2/system", **target):
    source = Host(name="src", uri=SSH_URI)
    target = Host(name="dst", uri=target_uri, **target)
    asked = {}

    def fact(key, fn):
        return fn()

    def measure(src, address, ports, p2p_uri=None, **_kw):
        asked.update(address=address, ports=ports)
        states = [reach.PortState(p, measured[1].get(p, reach.CLOSED)) for p in ports]
        p2p = None
        if measured[0] == reach.SOURCE and p2p_uri:  # what virsh said on the source
            said = measured[2] if len(measured) > 2 else "dst.example"
            p2p = {"uri": p2p_uri, "ok": said == "dst.example", "said": said, "user": "root"}
        return reach.Reach(measured[0], address, states, p2p=p2p)

    def host(side):
        raise Unavailable("no facts in this test")

    ctx = SimpleNamespace(
        source=source,
        target=target,
        options=options or {},
        strategy=SimpleNamespace(live=live),
        fact=fact,
        host=host,
    )
    return ctx, measure, asked


@pytest.mark.parametrize(
    ("vantage", "states", "status", "overridable", "said"),
    [
        (reach.SOURCE, {}, "pass", False, "measured on src over SSH"),
        (reach.SOURCE, {49183: reach.FILTERED, 49215: reach.FILTERED}, "fail", True, "firewall"),
        (reach.SOURCE, {49215: reach.FILTERED}, "warn", False, "49215"),
        (reach.SOURCE, {16509: reach.FILTERED}, "fail", True, "16509"),
        (reach.KVMWEB, {49183: reach.FILTERED, 49215: reach.FILTERED}, "warn", False, "not from src"),
        (reach.KVMWEB, {}, "pass", False, "measured from kvmweb's machine, not from src"),
    ],
)
def test_it_judges_what_was_measured_and_never_claims_more(
    monkeypatch, vantage, states, status, overridable, said
):
    ctx, measure, asked = _ctx((vantage, states))
    monkeypatch.setattr(reach, "measure", measure)
    made = check_migration_ports(ctx)
    assert (made.status, made.overridable) == (status, overridable), made.message
    assert said in made.message and asked == {"address": "10.0.0.2", "ports": [49183, 49215, 16509]}
    assert ("firewall-cmd" in made.remedy) == (status != "pass")


def test_it_probes_the_range_set_for_the_target_or_the_port_of_the_migration_uri(monkeypatch):
    ctx, measure, asked = _ctx((reach.SOURCE, {}), migration_port_min=50000, migration_port_max=50010)
    monkeypatch.setattr(reach, "measure", measure)
    assert "50000-50010, as set for dst" in check_migration_ports(ctx).message and asked["ports"] == [
        50005,
        50010,
        16509,
    ]
    ctx, measure, asked = _ctx((reach.SOURCE, {}), options={"migrate_uri": "tcp://192.0.2.7:49999"})
    monkeypatch.setattr(reach, "measure", measure)
    check_migration_ports(ctx)
    assert asked == {"address": "192.0.2.7", "ports": [49999]}


def test_it_needs_no_port_for_a_tunnelled_or_offline_move(monkeypatch):
    monkeypatch.setattr(reach, "measure", lambda *a, **k: pytest.fail("probed"))
    for ctx in (_ctx(None, options={"tunnelled": True})[0], _ctx(None, live=False)[0]):
        made = check_migration_ports(ctx)
        assert made.status == "pass" and "Not needed" in made.message


def test_it_names_the_blocked_ports_in_chinese(monkeypatch):
    ctx, measure, _asked = _ctx((reach.SOURCE, {49183: reach.FILTERED, 49215: reach.FILTERED}))
    monkeypatch.setattr(reach, "measure", measure)
    with translation.override("zh-hans"):
        made = check_migration_ports(ctx)
    assert "防火墙" in made.message and "49183" in made.message and "firewall-cmd" in made.remedy
    assert "防火墙" in made.remedy


@pytest.mark.django_db
def test_it_saves_the_migration_port_range_from_the_edit_page_audited(login, admin, operator):
    host = Host.objects.create(name="h1", uri="qemu+tcp://10.0.0.9/system")
    url = reverse("hosts:edit", args=[host.pk])
    form = {"name": "h1", "uri": host.uri, "migration_port_min": "50000", "migration_port_max": "50063"}
    assert login(operator).post(url, form).status_code == 403
    web = login(admin)
    response = web.post(url, {**form, "migration_port_max": "49000"})
    assert response.status_code == 200 and "ends before it starts" in response.content.decode()
    host.refresh_from_db()
    assert host.migration_port_min is None
    assert web.post(url, form).status_code == 302
    host.refresh_from_db()
    assert (host.migration_port_min, host.migration_port_max) == (50000, 50063)
    event = AuditEvent.objects.get(action="host.change")
    assert event.details["changes"]["migration_ports"] == ["", "50000-50063"] and event.actor == admin
    assert "50000–50063" in web.get(reverse("hosts:detail", args=[host.pk])).content.decode()


def test_it_verifies_peer_to_peer_on_the_source_or_names_what_the_source_said(monkeypatch):
    ctx, measure, _asked = _ctx((reach.SOURCE, {}))
    monkeypatch.setattr(reach, "measure", measure)
    made = check_transport(ctx)
    assert made.status == "pass" and made.details["p2p_verified"] is True
    assert (
        "Verified on src: virsh -c qemu+tcp://10.0.0.2/system hostname answered dst.example" in made.message
    )
    said = "error: Cannot recv data: Host key verification failed."
    ctx, measure, _asked = _ctx((reach.SOURCE, {}, said))
    monkeypatch.setattr(reach, "measure", measure)
    made = check_transport(ctx)
    assert made.status == "fail" and said in made.message and not made.overridable  # virsh ran as root
    assert "opens the target's URI itself" in made.remedy
    # Measured from kvmweb: nothing said about the source's own connection but that.
    ctx, measure, _asked = _ctx((reach.KVMWEB, {}))
    monkeypatch.setattr(reach, "measure", measure)
    made = check_transport(ctx)
    assert made.status == "pass" and made.details["p2p_verified"] is None and "Verified" not in made.message


def test_it_calls_peer_to_peer_not_verified_when_the_source_has_no_virsh(monkeypatch):
    """virsh missing on the source (exit 127) says nothing about the source's libvirtd
    opening the target's URI: "not verified", never a failure (as root not even
    overridable) with virsh's "command not found" as the reason."""
    target_uri = "qemu+tcp://10.0.0.2/system"
    _scripted_ssh(monkeypatch, "kvmweb-p2p 127 virsh: command not found\nkvmweb-probe 16509 0 \n")
    _states, p2p = reach.probe_from_source(SSH_URI, "10.0.0.2", [16509], timeout=1, p2p_uri=target_uri)
    assert p2p["ok"] is None and "not installed" in p2p["said"]
    ctx, _measure, _asked = _ctx((reach.SOURCE, {}))
    monkeypatch.setattr(
        reach, "measure", lambda src, address, ports, **kw: reach.Reach(reach.SOURCE, address, [], p2p=p2p)
    )
    made = check_transport(ctx)
    assert made.status == "pass" and made.details["p2p_verified"] is None
    assert "not installed" in made.details["p2p_not_verified"] and "failed" not in made.message

"""SSH on the KVM lab (every lab host runs its own sshd, lab/sshd.py): a host is added over
SSH by confirming its fingerprint, a running guest live-migrates peer to peer over SSH,
and sshd down, a key not authorised and a changed host key each end in a named error with
its remedy while nothing changes."""

import re
import stat
from html import unescape
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.urls import reverse

import lab as labkit
from hosts import services as host_services
from hosts import transport
from hosts.models import VM, Host
from kvmweb.audit.models import AuditEvent
from migrations_app import preflight, runner
from migrations_app.models import MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.services import do_create_job

pytestmark = pytest.mark.lab


def _uri(host):
    return transport.build_uri("ssh", labkit.ip(host))


def _fingerprint(host):
    return transport._fingerprint(labkit.ssh_host_key(host))


def _steps(uri):
    return {s["id"]: s for s in host_services.check_connection(uri, timeout=10)}


def _confirmed(hosts, admin):
    for h in hosts:
        host_services.do_confirm_host_key(_uri(h), _fingerprint(h), actor=admin)
    return {h: host_services.do_register_host(h, _uri(h), sync=False, actor=admin) for h in hosts}


def test_it_adds_a_host_over_ssh_confirming_its_fingerprint_and_live_migrates_peer_to_peer(
    ssh_lab, lab_guest, admin
):
    uri = _uri("lab-a")
    assert uri.startswith("qemu+libssh2://root@") and f"known_hosts={transport.known_hosts_path()}" in uri
    steps = _steps(uri)
    assert [steps[s]["status"] for s in ("uri", "resolve", "tcp")] == ["pass"] * 3
    first = steps["host_key"]
    assert first["status"] == "confirm" and steps["libvirt"]["status"] == "skip"
    assert [k["fingerprint"] for k in first["details"]["presented"]] == [_fingerprint("lab-a")]
    # No silent trust: before the confirmation libvirt itself refuses, and nothing is registered.
    with pytest.raises(host_services.HostError, match="not confirmed"):
        host_services.do_register_host("lab-a", uri, actor=admin)
    assert not Host.objects.exists()
    hosts = _confirmed(ssh_lab.hosts, admin)
    kh = transport.known_hosts_path()
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    confirm = AuditEvent.objects.filter(action="host.ssh_hostkey", outcome=AuditEvent.SUCCESS)
    assert {e.details["fingerprint"] for e in confirm} == {_fingerprint(h) for h in ssh_lab.hosts}
    assert all(s["status"] == "pass" for s in _steps(uri).values()), _steps(uri)
    assert all(h.status == Host.REACHABLE for h in hosts.values()), [h.last_error for h in hosts.values()]

    guest = lab_guest("ssh-live")
    assert not host_services.do_sync_inventory(hosts["lab-a"])["error"]
    vm = VM.objects.get(uuid=guest.uuid)
    report = preflight.run_preflight(
        MigrationPlan(vm, vm.host, hosts["lab-b"], "live", {}), measure_dirty_rate=False
    )
    assert not report.fails, [(r.id, r.message) for r in report.fails]
    check = {r.id: r for r in report.results}["transport"]
    assert "SSH" in check.message and str(kh) in check.message
    before = labkit.read_counter("lab-a", guest)
    job = do_create_job(
        vm,
        hosts["lab-b"],
        "live",
        {},
        actor=admin,
        report=report,
        acknowledged=[r.id for r in report.warnings],
    )
    assert runner.run_job(job.pk) == MigrationJob.SUCCEEDED
    job.refresh_from_db()
    assert job.status == MigrationJob.SUCCEEDED, job.error
    assert labkit.where(guest) == {"lab-b": "running"}
    assert labkit.read_counter("lab-b", guest) >= before  # the RAM moved, no fresh boot
    assert VM.objects.get(uuid=guest.uuid).host.name == "lab-b"


def _client(user):
    web = Client()
    web.force_login(user)
    return web


def test_it_adds_a_host_through_the_wizard_pages_confirming_its_fingerprint(
    ssh_lab, admin, operator, mallory
):
    connect, confirm, register = (reverse(f"hosts:{r}") for r in ("connect", "host_key_confirm", "add"))
    answers = {"transport": "ssh", "user": "root", "address": labkit.ip("lab-b"), "port": 22}
    wizard = f"{connect}?{urlencode(answers)}"
    web = _client(admin)
    assert web.get(connect).status_code == 200
    page = web.get(connect, answers)
    html = page.content.decode()
    uri = page.context["uri"]
    assert uri == _uri("lab-b") and uri.startswith(f"qemu+libssh2://root@{labkit.ip('lab-b')}/system?")
    steps = {s["id"]: s for s in page.context["steps"]}
    assert steps["host_key"]["status"] == "confirm" and steps["host_key"]["remedy"] in html
    fingerprint = _fingerprint("lab-b")
    assert f'data-confirm-key="{fingerprint}"' in html and "Confirm this fingerprint" in html
    assert 'id="register-form"' not in html and not page.context["ready"]

    # Operators may not add hosts (403); mallory, without a role, neither (no object: 403).
    for user in (operator, mallory):
        other = _client(user)
        assert other.get(connect, answers).status_code == 403
        assert other.post(confirm, {"uri": uri, "fingerprint": fingerprint}).status_code == 403
        assert other.post(register, {"name": "lab-b", "uri": uri}).status_code == 403
    assert not AuditEvent.objects.filter(action="host.ssh_hostkey").exists() and not Host.objects.exists()

    # Confirm (the form's own fields): audited, then back on the wizard, which tests again.
    shown = dict(re.findall(r'name="(uri|fingerprint|next)" value="([^"]*)"', html))
    shown = {k: unescape(v) for k, v in shown.items()}
    assert shown == {"uri": uri, "fingerprint": fingerprint, "next": wizard}
    page = web.post(confirm, shown, follow=True)
    assert page.redirect_chain == [(wizard, 302)]
    event = AuditEvent.objects.get(action="host.ssh_hostkey", outcome=AuditEvent.SUCCESS)
    assert event.actor == admin and event.details["fingerprint"] == fingerprint
    assert [s["status"] for s in page.context["steps"]] == ["pass"] * len(page.context["steps"])
    assert {s["id"] for s in page.context["steps"]} >= {"host_key", "ssh_auth", "libvirt"}
    html = page.content.decode()
    assert page.context["ready"] and 'id="register-form"' in html and "Register this host" in html

    # Register with the built URI (a name with HTML is shown escaped).
    page = web.post(register, {"name": "lab-b<i>", "uri": uri}, follow=True)
    host = Host.objects.get()
    assert page.redirect_chain == [(reverse("hosts:detail", args=[host.pk]), 302)]
    assert host.uri == uri and host.status == Host.REACHABLE, host.last_error
    html = page.content.decode()
    assert "lab-b&lt;i&gt;" in html and "lab-b<i>" not in html
    event = AuditEvent.objects.get(action="host.register", outcome=AuditEvent.SUCCESS)
    assert event.actor == admin


def test_it_names_each_ssh_failure_with_its_remedy_and_changes_nothing(
    ssh_lab, lab_guest, admin, settings, tmp_path
):
    hosts = _confirmed(["lab-a"], admin)
    uri_b = _uri("lab-b")
    host_services.do_confirm_host_key(uri_b, _fingerprint("lab-b"), actor=admin)
    guest = lab_guest("ssh-fail", wait=False)
    assert not host_services.do_sync_inventory(hosts["lab-a"])["error"]

    # 1. Key not authorised: another kvmweb key.
    good_key = settings.SSH_KEY_FILE or str(transport.ssh_key_path())
    settings.SSH_KEY_FILE = str(tmp_path / "other" / "id_ed25519")
    transport.generate_ssh_key()
    stranger = transport.build_uri("ssh", labkit.ip("lab-b"))
    steps = _steps(stranger)
    assert steps["host_key"]["status"] == "pass" and steps["ssh_auth"]["status"] == "fail"
    assert "authorized_keys" in steps["ssh_auth"]["remedy"]
    with pytest.raises(host_services.HostError, match="rejected kvmweb's SSH key") as caught:
        host_services.do_register_host("lab-b", stranger, actor=admin)
    assert "authorized_keys" in str(caught.value)
    settings.SSH_KEY_FILE = good_key

    # 2. Changed host key: kvmweb holds another key for lab-b than the one it presents.
    target = transport.ssh_target(uri_b)
    transport.write_host_keys(
        target, [transport.HostKey("ssh-ed25519", labkit.ssh_host_key("lab-a").split()[1])]
    )
    steps = _steps(uri_b)
    assert steps["host_key"]["status"] == "fail" and "CHANGED" in steps["host_key"]["message"]
    with pytest.raises(host_services.HostError, match="CHANGED") as caught:
        host_services.do_register_host("lab-b", uri_b, actor=admin)
    assert "Replace host key" in str(caught.value)
    with pytest.raises(host_services.HostError, match="Replace host key"):
        host_services.do_confirm_host_key(uri_b, _fingerprint("lab-b"), actor=admin)  # not silently
    refused = AuditEvent.objects.filter(action="host.register", outcome=AuditEvent.FAILURE)
    assert sorted(e.details["ssh_problem"] for e in refused) == ["auth_rejected", "host_key_changed"]
    assert not Host.objects.filter(name="lab-b").exists() and not MigrationJob.objects.exists()
    host_services.do_confirm_host_key(uri_b, _fingerprint("lab-b"), actor=admin, replace=True)
    replaced = AuditEvent.objects.filter(action="host.ssh_hostkey", details__action="replace").get()
    assert replaced.details["previous"] == [_fingerprint("lab-a")] and replaced.actor == admin
    target_b = host_services.do_register_host("lab-b", uri_b, sync=False, actor=admin)
    assert target_b.status == Host.REACHABLE, target_b.last_error

    # 3. sshd down on the target: the preflight names it, nothing moves.
    assert labkit.stop_sshd("lab-b")
    try:
        vm = VM.objects.get(uuid=guest.uuid)
        report = preflight.run_preflight(
            MigrationPlan(vm, vm.host, target_b, "live", {}), measure_dirty_rate=False
        )
        fails = {r.id: r for r in report.fails}
        assert "Cannot reach the SSH server" in fails["connection"].message
        assert "sshd" in fails["connection"].remedy
        steps = _steps(uri_b)
        assert steps["tcp"]["status"] == "fail" and "sshd" in steps["tcp"]["remedy"]
    finally:
        labkit.start_sshd(["lab-b"])
    assert labkit.where(guest) == {"lab-a": "running"} and not MigrationJob.objects.exists()

"""SSH host keys and the add-host wizard without the lab: kvmweb's own known_hosts (0600),
a fingerprint confirmed by an administrator (audited), a changed key refused unless
replaced (audited), URIs the wizard builds, "Test connection" step by step, and the
migration transport options (native TLS) with what the hosts support."""

import socket
import stat

import libvirt
import pytest
from django.urls import reverse

from hosts import services, transport
from hosts.models import VM, Host
from hosts.uris import InvalidURI, validate_uri
from kvmweb.audit.models import AuditEvent
from migrations_app.plan import MigrationPlan, PlanError

pytestmark = pytest.mark.django_db

KEY_A = transport.HostKey(
    "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIFq0aTE7pQmY6a3N0VbvbHgR5aXv2u6bW6yHn2m4x0bA"
)
KEY_B = transport.HostKey(
    "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIBv3jvE4hQ8Z2yN0mWJ2Xw6l5b6x8Qk9qP7gq6y3m1cD"
)


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    settings.SSH_KEY_FILE = ""
    return tmp_path


@pytest.fixture
def presents(monkeypatch):
    """presents(*keys): the host answers ssh-keyscan with these keys."""

    def set_keys(*keys):
        monkeypatch.setattr(transport, "scan_host_keys", lambda address, port=22, timeout=5: list(keys))

    return set_keys


def _uri(address="kvm1.example.com", port=None):
    return validate_uri(transport.build_uri("ssh", address, user="root", port=port))


def test_it_builds_libssh2_uris_naming_kvmwebs_key_and_known_hosts(data_dir):
    uri = _uri(port=2222)
    assert uri.startswith("qemu+libssh2://root@kvm1.example.com:2222/system?")
    assert (
        f"keyfile={data_dir / 'ssh' / 'id_ed25519'}" in uri
        and f"known_hosts={data_dir / 'ssh' / 'known_hosts'}" in uri
    )
    assert transport.ssh_target(uri).token == "[kvm1.example.com]:2222"
    assert validate_uri(transport.build_uri("tls", "10.0.0.5", pkipath="/etc/kvmweb/pki")) == (
        "qemu+tls://10.0.0.5/system?pkipath=/etc/kvmweb/pki"
    )
    for silent in ("auto", "ignore"):  # no silent trust of host keys
        with pytest.raises(InvalidURI, match="known_hosts_verify"):
            validate_uri(f"qemu+libssh2://root@h/system?known_hosts_verify={silent}")


def test_it_stores_a_confirmed_fingerprint_in_its_own_known_hosts_and_audits_it(data_dir, presents, admin):
    presents(KEY_A)
    uri = _uri()
    services.do_confirm_host_key(uri, KEY_A.fingerprint, actor=admin)
    kh = data_dir / "ssh" / "known_hosts"
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    assert kh.read_text() == f"kvm1.example.com {KEY_A.keytype} {KEY_A.blob}\n"
    event = AuditEvent.objects.get(action="host.ssh_hostkey")
    assert event.actor == admin and event.details["fingerprint"] == KEY_A.fingerprint
    assert event.details["action"] == "confirm" and event.target_name == "kvm1.example.com"


def test_it_refuses_a_fingerprint_the_host_does_not_present(data_dir, presents, admin):
    presents(KEY_B)  # someone in the middle since the page was shown, or a stale page
    with pytest.raises(services.HostError, match="does not present"):
        services.do_confirm_host_key(_uri(), KEY_A.fingerprint, actor=admin)
    assert not (data_dir / "ssh" / "known_hosts").exists() or not transport.stored_host_keys(
        transport.ssh_target(_uri())
    )
    assert AuditEvent.objects.get(action="host.ssh_hostkey").outcome == AuditEvent.FAILURE


def test_it_blocks_a_changed_key_until_an_administrator_replaces_it(data_dir, presents, admin):
    uri = _uri()
    presents(KEY_A)
    services.do_confirm_host_key(uri, KEY_A.fingerprint, actor=admin)
    presents(KEY_B)
    with pytest.raises(services.HostError, match="Replace host key"):
        services.do_confirm_host_key(uri, KEY_B.fingerprint, actor=admin)
    assert transport.stored_host_keys(transport.ssh_target(uri)) == [KEY_A]
    services.do_confirm_host_key(uri, KEY_B.fingerprint, actor=admin, replace=True)
    assert transport.stored_host_keys(transport.ssh_target(uri)) == [KEY_B]
    replaced = AuditEvent.objects.get(action="host.ssh_hostkey", details__action="replace")
    assert replaced.details["previous"] == [KEY_A.fingerprint]


def test_it_diagnoses_step_by_step_and_stops_at_the_first_failure(data_dir, presents):
    assert services.check_connection("qemu+ssh://h/system?command=/bin/sh")[0]["status"] == "fail"
    steps = services.check_connection(_uri("nosuch.invalid"), timeout=3)
    assert [(s["id"], s["status"]) for s in steps] == [
        ("uri", "pass"),
        ("resolve", "fail"),
        ("libvirt", "skip"),
    ]
    assert steps[1]["remedy"] and not services.connection_ready(steps)
    with socket.socket() as s:  # a port nobody listens on: "sshd down"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps = {s["id"]: s for s in services.check_connection(_uri("127.0.0.1", port), timeout=3)}
    assert steps["tcp"]["status"] == "fail" and "sshd" in steps["tcp"]["remedy"]
    assert "host_key" not in steps and steps["libvirt"]["status"] == "skip"
    assert not services.connection_ready(list(steps.values())) and not services.connection_ready([])
    steps = {s["id"]: s for s in services.check_connection("test:///default")}
    assert steps["libvirt"]["status"] == "pass"
    assert services.connection_ready(list(steps.values()))


def test_it_offers_the_wizard_and_key_actions_to_administrators_only(
    data_dir, login, admin, operator, alice, presents
):
    page = login(admin).get(reverse("hosts:connect"), {"transport": "tcp", "address": "nosuch.invalid"})
    assert page.status_code == 200 and "qemu+tcp://nosuch.invalid/system" in page.content.decode()
    assert not page.context["ready"] and 'id="register-form"' not in page.content.decode()
    assert login(operator).get(reverse("hosts:connect")).status_code == 403
    presents(KEY_A)
    uri = _uri()
    assert login(operator).post(reverse("hosts:host_key_confirm"), {"uri": uri}).status_code == 403
    assert not AuditEvent.objects.filter(action="host.ssh_hostkey").exists()
    response = login(admin).post(
        reverse("hosts:host_key_confirm"), {"uri": uri, "fingerprint": KEY_A.fingerprint}
    )
    assert response.status_code == 302 and transport.stored_host_keys(transport.ssh_target(uri)) == [KEY_A]
    host = Host.objects.create(name="kvm1", uri=uri)
    presents(KEY_B)
    assert login(operator).post(reverse("hosts:host_key_replace", args=[host.pk])).status_code == 403
    assert login(alice).post(reverse("hosts:host_key_replace", args=[host.pk])).status_code == 404
    login(admin).post(reverse("hosts:host_key_replace", args=[host.pk]), {"fingerprint": KEY_B.fingerprint})
    assert transport.stored_host_keys(transport.ssh_target(uri)) == [KEY_B]


def test_it_names_libssh_failures_with_a_remedy():
    from hosts import hypervisor

    cases = {
        "libssh transport error: No user interaction callback provided: Can't verify the session host key": (
            "host_key_unknown"
        ),
        "authentication failed: !!! SSH HOST KEY VERIFICATION FAILED !!!: Identity of host '127.0.0.3:22' "
        "differs from stored identity.": "host_key_changed",
        "authentication failed: All provided authentication methods with credentials were rejected by the "
        "server": "auth_rejected",
    }
    for raw, problem in cases.items():
        exc = libvirt.libvirtError(raw)
        exc.err = (libvirt.VIR_ERR_AUTH_FAILED, 0, raw, 0, "", "", "", 0, 0)
        named = hypervisor._explain(exc, "qemu+libssh2://root@h/system", "Connecting")
        assert isinstance(named, hypervisor.SSHError) and named.problem == problem and named.remedy


def test_it_maps_native_tls_to_its_flag_and_says_which_options_the_hosts_support(db):
    a = Host.objects.create(name="alpha", uri="qemu+tcp://10.0.0.1/system")
    b = Host.objects.create(name="beta", uri="qemu+tcp://10.0.0.2/system")
    vm = VM.objects.create(uuid="11111111-2222-3333-4444-555555555599", name="w", host=a, state=VM.RUNNING)
    plan = MigrationPlan(vm=vm, source=a, target=b, mode="live", options={"tls": True})
    assert plan.flags() & libvirt.VIR_MIGRATE_TLS and "--tls" in plan.virsh_command()
    with pytest.raises(PlanError, match="tunnelled"):
        MigrationPlan(
            vm=vm, source=a, target=b, mode="live", options={"tls": True, "tunnelled": True}
        ).validate()
    new = {"libvirt_version": 9_000_000, "hypervisor_version": 7_002_000}
    old = {"libvirt_version": 3_000_000, "hypervisor_version": 2_005_000}
    support = transport.option_support(new, new, {"tls": True})
    assert all(s["supported"] for s in support.values()) and support["tls"]["chosen"]
    status, message, remedy, details = transport.with_option_support(
        ("pass", "ok", "", {}), new, old, {"tls": True}
    )
    assert status == "fail" and "tls" in remedy and not details["options"]["parallel"]["supported"]
    assert "compression (--compressed)" in message

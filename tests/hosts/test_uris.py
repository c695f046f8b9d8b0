"""The URI table: what kvmweb accepts and refuses, and what it says."""

import pytest

from hosts import services
from hosts.models import Host
from hosts.uris import InvalidURI, validate_uri
from kvmweb.audit.models import AuditEvent

GOOD = [
    "qemu:///system",
    "qemu:///session",
    "qemu+ssh://root@kvm1.example.com/system",
    "qemu+ssh://root@kvm1.example.com:2222/system?keyfile=/etc/kvmweb/id_ed25519",
    "qemu+ssh://root@kvm1/system?known_hosts=/etc/kvmweb/known_hosts&no_tty=1",
    "qemu+tls://kvm1.example.com/system",
    "qemu+tls://kvm1.example.com/system?pkipath=/etc/kvmweb/pki",
    "qemu+tcp://127.0.0.2/system",
    "qemu+unix:///system",
    "test:///default",
]

BAD = [
    ("qemu+ext:///system?command=/bin/echo", "Transport 'qemu+ext' is not allowed"),
    ("qemu+ssh://h/system?command=/bin/sh", "Parameter 'command' is refused: it runs a program"),
    ("qemu+ssh://h/system?netcat=/tmp/evil", "Parameter 'netcat' is refused"),
    ("qemu+unix:///system?socket=/tmp/evil.sock", "Parameter 'socket' is refused"),
    ("qemu+tls://h/system?no_verify=1", "disables TLS certificate verification"),
    ("qemu+ssh://h/system?foo=bar", "Parameter 'foo' is not on the list of safe parameters"),
    ("qemu+tcp://h/system?keyfile=/k", "Parameter 'keyfile' does not apply to qemu+tcp"),
    ("qemu+ssh://h/system?keyfile=relative", "must be an absolute path"),
    ("qemu+ssh://h/system?mode=evil", "must be one of"),
    ("qemu+ssh://h/system?keyfile=/a&keyfile=/b", "given twice"),
    ("qemu+libssh2://h/system?known_hosts_verify=ignore", "known_hosts_verify"),
    ("xen:///system", "is not allowed"),
    ("http://example.com/", "is not allowed"),
    ("qemu+ssh://h/system;rm -rf /", "characters that are not allowed"),
    ("qemu+ssh://h/system`id`", "characters that are not allowed"),
    ("qemu+ssh://user:secret@h/system", "Do not put passwords"),
    ("qemu+ssh:///system", "need a host name"),
    ("qemu://host/system", "take no host name"),
    ("qemu+tcp://h/other", "The path must be /system or /session"),
    ("qemu+tcp://h:99999/system", "port"),
    ("test://host/default", "take no host"),
    ("test:///etc/passwd", "must be test:///default or a .xml node file"),
    ("test:///srv/demo/node.xml", "under"),  # outside KVMWEB_TEST_DRIVER_DIR
    ("qemu+ssh://-oProxyCommand=touch%20x/system", "must not start with '-'"),
    ("qemu+ssh://-oProxyCommand=x@h/system", "user name must not be empty or start with '-'"),
    ("qemu+tcp://999.0.0.1/system", "not a valid IPv4 address"),
    ("qemu+tcp://a..b/system", "not a valid host name"),
    ("qemu+tcp://[fe80::zz]/system", "not a valid host name or IPv6 address"),
    ("", "Enter a libvirt URI"),
    ("qemu+tcp://h/system#frag", "fragment"),
]


@pytest.mark.parametrize("uri", GOOD)
def test_it_accepts_safe_uris(uri):
    assert validate_uri(f"  {uri} ") == uri


@pytest.mark.parametrize("uri, message", BAD)
def test_it_refuses_unsafe_uris_with_the_reason(uri, message):
    with pytest.raises(InvalidURI) as exc:
        validate_uri(uri)
    assert message in str(exc.value)


# Spellings of one libvirt endpoint -> the one form kvmweb stores.
SAME = [
    ("qemu+tcp://127.0.0.2/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://127.0.0.2:16509/system", "qemu+tcp://127.0.0.2/system"),
    ("QEMU+TCP://127.0.0.2/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://0x7f.0.0.2/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://0177.0.0.2/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://2130706434/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://127.2/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://[::ffff:127.0.0.2]/system", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://127.0.0.2/system/", "qemu+tcp://127.0.0.2/system"),
    ("qemu+tcp://127.0.0.2:16514/system", "qemu+tcp://127.0.0.2:16514/system"),  # not tcp's default
    ("qemu+tls://KVM1.Example.COM.:16514/system", "qemu+tls://kvm1.example.com/system"),
    ("qemu+tls://[2001:DB8:0::1]/system", "qemu+tls://[2001:db8::1]/system"),
    ("qemu+ssh://Root@kvm1:22/system?no_tty=1&keyfile=/k", "qemu+ssh://Root@kvm1/system?keyfile=/k&no_tty=1"),
    ("Test:///default/", "test:///default"),
]


@pytest.mark.parametrize("uri, normal", SAME)
def test_it_stores_one_spelling_of_each_uri(uri, normal):
    assert validate_uri(uri) == normal
    assert validate_uri(normal) == normal  # idempotent


def test_it_accepts_test_driver_files_only_under_the_configured_directory(settings, tmp_path):
    inside = tmp_path / "lab" / "node.xml"
    inside.parent.mkdir()
    inside.write_text("<node/>")
    settings.KVMWEB_TEST_DRIVER_DIR = str(tmp_path / "lab")
    assert validate_uri(f"test://{inside}") == f"test://{inside}"
    escape = f"test://{tmp_path}/lab/../outside.xml"
    with pytest.raises(InvalidURI, match="must be under"):
        validate_uri(escape)
    (tmp_path / "lab" / "link.xml").symlink_to("/etc/hostname")
    with pytest.raises(InvalidURI, match="must be under"):
        validate_uri(f"test://{tmp_path}/lab/link.xml")
    settings.KVMWEB_TEST_DRIVER_DIR = None
    with pytest.raises(InvalidURI, match="KVMWEB_TEST_DRIVER_DIR"):
        validate_uri(f"test://{inside}")
    assert validate_uri("test:///default") == "test:///default"


@pytest.mark.django_db
@pytest.mark.parametrize("spelling", [uri for uri, normal in SAME if normal == "qemu+tcp://127.0.0.2/system"])
def test_it_refuses_a_second_spelling_of_a_registered_uri(spelling, admin):
    # Registered while unreachable (port 1 answers nothing): the URI check alone refuses.
    Host.objects.create(name="first", uri="qemu+tcp://127.0.0.2/system")
    with pytest.raises(services.HostError, match="already registered, as host first"):
        services.do_register_host("second", spelling, actor=admin, sync=False)
    assert list(Host.objects.values_list("name", flat=True)) == ["first"]


@pytest.fixture
def same_machine(monkeypatch):
    """Every test-driver node reports one host UUID, as two URIs of one libvirtd would
    (the test driver itself reports none)."""
    from hosts import hypervisor

    real = hypervisor._read_facts

    def facts(conn):
        return dict(real(conn), host_uuid="4c4c4544-0031-3910-8036-b4c04f563232")

    monkeypatch.setattr(hypervisor, "_read_facts", facts)


@pytest.mark.django_db
def test_it_refuses_a_second_registration_of_the_same_libvirt_host(node_xml, admin, same_machine):
    first = services.do_register_host("kvm1", f"test://{node_xml('a')}", actor=admin)
    assert first.host_uuid == "4c4c4544-0031-3910-8036-b4c04f563232" and first.vms.count() > 0
    with pytest.raises(services.HostError, match="already registered as kvm1") as exc:
        services.do_register_host("kvm1-again", f"test://{node_xml('b')}", actor=admin)
    assert "4c4c4544-0031-3910-8036-b4c04f563232" in str(exc.value)
    assert list(Host.objects.values_list("name", flat=True)) == ["kvm1"]
    refusal = AuditEvent.objects.get(action="host.register", outcome=AuditEvent.FAILURE)
    assert refusal.actor == admin and refusal.target_name == "kvm1-again"
    assert refusal.details["same_as"] == "kvm1"


@pytest.mark.django_db
def test_it_never_syncs_a_twin_registered_while_unreachable(node_xml, admin, same_machine):
    """A host registered while it could not be probed, that turns out to be a registered
    machine, is marked unreachable with the reason; its VMs stay with the first row."""
    from hosts.models import VM

    first = services.do_register_host("kvm1", f"test://{node_xml('a')}", actor=admin)
    vms = dict(VM.objects.values_list("uuid", "host_id"))
    twin = Host.objects.create(name="kvm1-again", uri=f"test://{node_xml('b')}")
    summary = services.do_sync_inventory(twin, actor=admin)
    assert "already registered as kvm1" in summary["error"]
    twin.refresh_from_db()
    assert twin.status == Host.UNREACHABLE and "kvm1" in twin.last_error
    assert dict(VM.objects.values_list("uuid", "host_id")) == vms  # nothing moved
    assert not VM.objects.filter(host=twin).exists() and first.vms.count() == len(vms)
    assert services.do_probe_host(twin) is False


@pytest.mark.lab
def test_it_refuses_a_second_registration_of_a_real_libvirt_host(lab, admin, db):
    """Two URIs that reach one real libvirtd (a lab host) and that no spelling rule can
    fold into one: the host UUID tells."""
    uri = lab.uri(lab.hosts[0])
    first = services.do_register_host("lab-first", uri, actor=admin, sync=False)
    assert first.is_reachable and first.host_uuid
    with pytest.raises(services.HostError, match="already registered as lab-first"):
        services.do_register_host("lab-second", f"{uri}?mode=legacy", actor=admin, sync=False)
    assert Host.objects.count() == 1


@pytest.mark.django_db
def test_it_never_opens_a_refused_uri_and_audits_the_failure(tmp_path, admin):
    marker = tmp_path / "ran"
    with pytest.raises(services.HostError, match="refused"):
        services.do_register_host(
            "evil", f"qemu+ssh://h/system?command=/usr/bin/touch%20{marker}", actor=admin
        )
    assert not marker.exists() and not Host.objects.exists()
    event = AuditEvent.objects.get(action="host.register")
    assert event.outcome == AuditEvent.FAILURE and event.actor == admin and event.target_name == "evil"


@pytest.mark.django_db
def test_it_refuses_duplicate_names_and_uris():
    services.do_register_host("a", "test:///default")
    with pytest.raises(services.HostError, match="named a is already"):
        services.do_register_host("a", "qemu+tcp://127.0.0.1:1/system")
    with pytest.raises(services.HostError, match="already registered"):
        services.do_register_host("b", "test:///default")
    assert Host.objects.count() == 1

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
    "test:///srv/demo/node.xml",
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
    ("qemu+libssh2://h/system", "is not allowed"),
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
    ("test:///etc/passwd", "must be test:///default or an absolute path"),
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

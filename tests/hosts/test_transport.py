"""qemu+tls hosts without a lab: kvmweb reads its client certificate's expiry, warns on
the host page 30 days ahead, names libvirt's certificate errors with a remedy, and the
migration preflight says which transport a peer-to-peer migration uses."""

from types import SimpleNamespace

import pytest
from django.urls import reverse

from hosts import hypervisor, transport
from hosts.models import Host

pytestmark = pytest.mark.django_db


def _uri(path):
    return f"qemu+tls://192.0.2.7/system?pkipath={path}"


def test_it_reads_the_client_certificate_expiry_and_warns_within_30_days(pki_dir, tmp_path):
    assert transport.client_certificate("qemu+tcp://192.0.2.7/system") is None
    fine = transport.client_certificate(_uri(pki_dir(90)))
    assert fine.status == transport.OK and 89 <= fine.days_left <= 90 and not fine.needs_attention
    soon = transport.client_certificate(_uri(pki_dir(10)))
    assert soon.status == transport.EXPIRING and soon.days_left in (9, 10)
    assert "clientcert.pem" in soon.remedy
    gone = transport.client_certificate(_uri(pki_dir(-1)))
    assert gone.status == transport.EXPIRED and "expired" in gone.message
    missing = transport.client_certificate(_uri(tmp_path / "nowhere"))
    assert missing.status == transport.MISSING and missing.path.endswith("nowhere/clientcert.pem")


def test_it_warns_on_the_host_page_before_the_certificate_expires(login, admin, pki_dir):
    soon = Host.objects.create(name="tls-soon", uri=_uri(pki_dir(10)))
    fine = Host.objects.create(name="tls-fine", uri=_uri(pki_dir(400)))
    client = login(admin)
    page = client.get(reverse("hosts:detail", args=[soon.pk])).content.decode()
    assert 'id="tls-certificate-warning"' in page
    assert "in 9 days" in page or "in 10 days" in page
    assert "clientcert.pem" in page  # administrators see which file to renew
    page = client.get(reverse("hosts:detail", args=[fine.pk])).content.decode()
    assert "tls-certificate-warning" not in page and "TLS client certificate" in page


def test_it_names_libvirt_certificate_errors_with_a_remedy():
    cases = {
        "The client certificate /p/clientcert.pem has expired": "expired",
        "Our own certificate /p/clientcert.pem failed validation against /p/cacert.pem: "
        "The certificate hasn't got a known issuer.": "untrusted",
        "Cannot read CA certificate '/p/cacert.pem': No such file or directory": "missing",
        "Certificate's owner does not match the hostname 10.0.0.1": "hostname",
    }
    for raw, problem in cases.items():
        assert hypervisor._tls_problem(raw.lower()) == problem
        message, remedy = hypervisor._explain_tls(problem, raw, "qemu+tls://h/system")
        assert raw in message and remedy
    assert hypervisor._tls_problem("unable to connect to server: connection refused") == ""


def test_it_says_which_transport_a_peer_to_peer_migration_uses(pki_dir):
    tcp = SimpleNamespace(name="a", uri="qemu+tcp://192.0.2.1/system")
    status, message, remedy, details = transport.migration_check(tcp, tcp)
    assert status == "pass" and "plain TCP" in message and "unencrypted" in details["data"]
    good = SimpleNamespace(name="b", uri=_uri(pki_dir(400)))
    status, message, _remedy, details = transport.migration_check(good, good, tunnelled=True)
    assert status == "pass" and "TLS" in message and "tunnelled" in details["data"]
    assert details["target_certificate"]["status"] == "ok" and not details["source_files_verified"]
    soon = SimpleNamespace(name="c", uri=_uri(pki_dir(5)))
    assert transport.migration_check(good, soon)[0] == "warn"
    expired = SimpleNamespace(name="d", uri=_uri(pki_dir(-1)))
    status, message, remedy, _details = transport.migration_check(good, expired)
    assert status == "fail" and message.startswith("d: ") and "expired" in message and remedy

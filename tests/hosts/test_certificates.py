"""A qemu+tls host's own client certificate (hosts/transport.py, do_set_tls_certificate):
an administrator uploads a CA, certificate and key (checked, stored 0600 in a directory of
their own, the URI's pkipath pointing at it) or names a pkipath directory; audited either
way, refusals too; the host list warns before the certificate expires. The lab proof (a
libvirtd accepting the stored files, an expired one named) is in test_transport_lab.py."""

import os
import stat
import time
from pathlib import Path

import pytest
from django.urls import reverse

from hosts import services, transport
from hosts.models import Host
from hosts.uris import validate_uri
from kvmweb.audit.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def tls_host(settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"
    return Host.objects.create(name="kvm1", uri="qemu+tls://10.0.0.5/system?tls_priority=NORMAL")


def test_it_checks_a_bundle_and_names_what_is_wrong(pem_bundle):
    ca, cert, key = pem_bundle()
    facts = transport.check_bundle(ca, cert, key)
    assert "CN=kvmweb" in facts["subject"] and len(facts["fingerprint"]) == 64
    other_ca = pem_bundle(ca="another-ca")[0]
    wrong_key = pem_bundle()[2]
    cases = [
        ((ca, *pem_bundle(days=-1)[1:]), "expired"),
        ((other_ca, cert, key), "not signed by the CA"),
        ((ca, cert, wrong_key), "does not belong"),
        ((ca, *pem_bundle(server_only=True)[1:]), "clientAuth"),
        ((ca, "hello", key), "not readable PEM"),
    ]
    for args, said in cases:
        with pytest.raises(transport.CertificateProblem, match=said) as caught:
            transport.check_bundle(*args)
        assert caught.value.remedy


def test_it_stores_an_uploaded_certificate_for_one_host_and_points_its_uri_at_it(
    login, admin, tls_host, pem_bundle
):
    ca, cert, key = pem_bundle()
    web = login(admin)
    url = reverse("hosts:certificate", args=[tls_host.pk])
    assert web.get(url).status_code == 200
    response = web.post(url, {"ca_pem": ca, "cert_pem": cert, "key_pem": key})
    assert response.status_code == 302
    tls_host.refresh_from_db()
    files = transport.tls_files(tls_host.uri)
    directory = files["cert"].parent
    assert directory.parent == transport.managed_pki_root() and directory.name.startswith(f"{tls_host.pk}-")
    assert "tls_priority=NORMAL" in tls_host.uri  # the other parameters are kept
    assert (
        files["cert"].read_text().strip() == cert.strip() and files["key"].read_text().strip() == key.strip()
    )
    assert (
        stat.S_IMODE(files["key"].stat().st_mode) == 0o600 and stat.S_IMODE(directory.stat().st_mode) == 0o700
    )
    event = AuditEvent.objects.get(action="host.tls_certificate")
    assert event.outcome == AuditEvent.SUCCESS and event.details["source"] == "upload"
    assert event.details["pkipath"] == str(directory) and event.details["fingerprint"]
    assert "PRIVATE KEY" not in str(event.details)
    assert transport.client_certificate(tls_host.uri).status == transport.OK
    # A new upload replaces it: a new directory, the old one (key included) removed.
    web.post(url, dict(zip(("ca_pem", "cert_pem", "key_pem"), pem_bundle(), strict=True)))
    tls_host.refresh_from_db()
    assert transport.tls_files(tls_host.uri)["cert"].parent != directory and not directory.exists()
    # Removing the host removes what kvmweb stored for it.
    services.do_remove_host(tls_host, actor=admin)
    assert not list(transport.managed_pki_root().iterdir())


def test_it_refuses_an_expired_certificate_and_changes_nothing(login, admin, tls_host, pem_bundle):
    ca, cert, key = pem_bundle(days=-1)
    before = tls_host.uri
    response = login(admin).post(
        reverse("hosts:certificate", args=[tls_host.pk]), {"ca_pem": ca, "cert_pem": cert, "key_pem": key}
    )
    assert response.status_code == 200 and "expired on" in response.content.decode()
    tls_host.refresh_from_db()
    assert tls_host.uri == before and not transport.managed_pki_root().exists()
    event = AuditEvent.objects.get(action="host.tls_certificate")
    assert event.outcome == AuditEvent.FAILURE and "expired" in event.details["reason"]


def test_it_points_a_host_at_a_certificate_directory(admin, tls_host, pki_dir):
    directory = pki_dir(90)
    services.do_set_tls_certificate(tls_host, pkipath=str(directory), actor=admin)
    tls_host.refresh_from_db()
    assert transport.tls_files(tls_host.uri)["cert"] == directory / "clientcert.pem"
    event = AuditEvent.objects.get(action="host.tls_certificate")
    assert event.details["source"] == "directory" and event.details["not_after"]
    with pytest.raises(services.HostError, match="lacks"):
        services.do_set_tls_certificate(tls_host, pkipath=str(Path(directory).parent), actor=admin)
    with pytest.raises(services.HostError, match="expired"):
        services.do_set_tls_certificate(tls_host, pkipath=str(pki_dir(-2)), actor=admin)
    assert AuditEvent.objects.filter(action="host.tls_certificate", outcome=AuditEvent.FAILURE).count() == 2


def test_it_lets_only_administrators_change_a_certificate_and_only_of_tls_hosts(
    login, admin, operator, mallory, tls_host, pem_bundle
):
    url = reverse("hosts:certificate", args=[tls_host.pk])
    assert login(operator).get(url).status_code == 403
    assert login(mallory).get(url).status_code == 404  # out of scope
    ssh = Host.objects.create(name="s1", uri="qemu+tcp://10.0.0.6/system")
    with pytest.raises(services.HostError, match="Only qemu\\+tls hosts"):
        services.do_set_tls_certificate(ssh, pkipath="/etc/pki", actor=admin)
    assert not AuditEvent.objects.filter(action="host.tls_certificate", outcome=AuditEvent.SUCCESS).exists()


def test_it_warns_in_the_host_list_before_the_certificate_bites(login, admin, operator, pki_dir, settings):
    settings.TLS_EXPIRY_WARN_DAYS = 30
    Host.objects.create(name="soon", uri=f"qemu+tls://10.0.0.7/system?pkipath={pki_dir(10)}")
    Host.objects.create(name="gone", uri=f"qemu+tls://10.0.0.8/system?pkipath={pki_dir(-1)}")
    Host.objects.create(name="fine", uri=f"qemu+tls://10.0.0.9/system?pkipath={pki_dir(200)}")
    page = login(operator).get(reverse("hosts:list")).content.decode()
    assert page.count("tls-certificate") == 2
    assert "certificate expires in 9 days" in page or "certificate expires in 10 days" in page
    assert "certificate not usable" in page and "libvirt refuses" not in page  # details for admins only
    assert "libvirt refuses to connect with it" in login(admin).get(reverse("hosts:list")).content.decode()


def test_it_stores_a_certificate_for_a_host_not_registered_yet_and_hands_the_wizard_its_directory(
    login, admin, operator, pem_bundle, settings, tmp_path
):
    settings.DATA_DIR = tmp_path / "data"
    url = reverse("hosts:certificate_new") + "?address=kvm9.example"
    ca, cert, key = pem_bundle()
    assert login(operator).post(url, {"ca_pem": ca, "cert_pem": cert, "key_pem": key}).status_code == 403
    web = login(admin)
    assert (
        web.post(
            url, dict(zip(("ca_pem", "cert_pem", "key_pem"), pem_bundle(days=-3), strict=True))
        ).status_code
        == 200
    )
    assert not transport.managed_pki_root().exists()
    response = web.post(url, {"ca_pem": ca, "cert_pem": cert, "key_pem": key})
    assert response.status_code == 302 and response.url.startswith(reverse("hosts:connect"))
    [directory] = transport.managed_pki_root().iterdir()
    assert (
        directory.name.startswith("new-") and (directory / "clientkey.pem").read_text().strip() == key.strip()
    )
    assert (
        f"pkipath={directory}".replace("/", "%2F") in response.url and "address=kvm9.example" in response.url
    )
    assert key.strip()[:40] not in response.url  # the key never travels in a URL
    events = AuditEvent.objects.filter(action="host.tls_certificate").order_by("pk")
    assert [e.outcome for e in events] == [AuditEvent.FAILURE, AuditEvent.SUCCESS]
    assert events[1].details["staged"] is True and events[1].details["pkipath"] == str(directory)
    # The wizard builds the URI with it; once registered, the host's page knows the certificate.
    page = web.get(response.url).content.decode()
    assert f"pkipath={directory}" in page


def test_it_keeps_the_uploaded_key_out_of_error_reports(login, admin, tls_host, pem_bundle):
    """Django's error reports (mail to ADMINS, the debug page) show POST data unless the
    view marks it sensitive: the private key must never be in one."""
    from django.views.debug import SafeExceptionReporterFilter

    ca, cert, key = pem_bundle()
    for url in (reverse("hosts:certificate", args=[tls_host.pk]), reverse("hosts:certificate_new")):
        response = login(admin).post(url, {"ca_pem": ca, "cert_pem": "not pem", "key_pem": key})
        assert response.status_code == 200  # refused: the form again
        shown = SafeExceptionReporterFilter().get_post_parameters(response.wsgi_request)
        assert shown["key_pem"] != key and set(shown["key_pem"]) == {"*"}
        assert shown["cert_pem"] == "not pem"


def test_it_never_deletes_the_directory_above_the_stored_certificates(admin, tls_host, pem_bundle):
    """A host whose pkipath is <managed root>/.. (typed on the Edit page: nothing checks
    the files there) is removed: the certificates kvmweb stored for the other hosts stay."""
    services.do_set_tls_certificate(
        tls_host, **dict(zip(("ca_pem", "cert_pem", "key_pem"), pem_bundle(), strict=True))
    )
    tls_host.refresh_from_db()
    kept = transport.tls_files(tls_host.uri)["key"]
    root = transport.managed_pki_root()
    odd = Host.objects.create(name="odd", uri=f"qemu+tls://10.0.0.6/system?pkipath={root}/..")
    assert transport.managed_dir(odd.uri) is None
    services.do_remove_host(odd, actor=admin)
    assert kept.exists() and root.exists()


def test_it_removes_the_files_it_wrote_when_it_refuses_the_new_uri(admin, tls_host, pem_bundle):
    """The bundle is written before the host's new URI is checked: a refusal then (the URI
    clashes with another host's) leaves no copy of the key behind."""
    ca, cert, key = pem_bundle()
    fingerprint = transport.check_bundle(ca, cert, key)["fingerprint"]
    directory = transport.managed_pki_root() / f"{tls_host.pk}-{fingerprint[:12]}"
    Host.objects.create(name="twin", uri=validate_uri(transport.with_pkipath(tls_host.uri, str(directory))))
    with pytest.raises(services.HostError, match="already uses the URI"):
        services.do_set_tls_certificate(tls_host, ca_pem=ca, cert_pem=cert, key_pem=key, actor=admin)
    assert not directory.exists()
    assert AuditEvent.objects.get(action="host.tls_certificate").outcome != AuditEvent.SUCCESS


def test_it_removes_the_stored_certificate_when_the_uri_is_edited_away_from_it(admin, tls_host, pem_bundle):
    services.do_set_tls_certificate(
        tls_host, **dict(zip(("ca_pem", "cert_pem", "key_pem"), pem_bundle(), strict=True))
    )
    tls_host.refresh_from_db()
    directory = transport.managed_dir(tls_host.uri)
    # Another parameter changed, the pkipath kept: the files stay.
    services.do_update_host(
        tls_host, name="kvm1", uri=tls_host.uri.replace("NORMAL", "SECURE256"), actor=admin
    )
    assert directory.exists()
    services.do_update_host(tls_host, name="kvm1", uri="qemu+tls://10.0.0.5/system", actor=admin)
    assert not directory.exists()
    assert AuditEvent.objects.filter(action="host.change").count() == 2


def test_it_sweeps_staged_bundles_nobody_registered_after_a_day(admin, tls_host, pem_bundle):
    ca, cert, key = pem_bundle()
    abandoned = services.do_stage_tls_certificate(ca_pem=ca, cert_pem=cert, key_pem=key, actor=admin)
    ca2, cert2, key2 = pem_bundle()
    used = services.do_stage_tls_certificate(ca_pem=ca2, cert_pem=cert2, key_pem=key2, actor=admin)
    Host.objects.create(name="kvm9", uri=validate_uri(f"qemu+tls://10.0.0.9/system?pkipath={used}"))
    crashed = transport.managed_pki_root() / ".new-abc.4242.tmp"
    crashed.mkdir()
    day_old = time.time() - 25 * 3600
    for path in (abandoned, used, crashed):
        os.utime(path, (day_old, day_old))
    ca3, cert3, key3 = pem_bundle()
    fresh = services.do_stage_tls_certificate(ca_pem=ca3, cert_pem=cert3, key_pem=key3, actor=admin)

    assert services.do_sweep_staged_certificates() == sorted([str(crashed), str(abandoned)])
    assert not abandoned.exists() and not crashed.exists()
    assert used.exists() and fresh.exists()  # named by a host; younger than a day
    removed = AuditEvent.objects.filter(action="host.tls_certificate", details__removed=True)
    assert [e.details["pkipath"] for e in removed] == [str(abandoned)]
    assert services.do_sweep_staged_certificates() == []  # idempotent

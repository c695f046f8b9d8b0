"""qemu+tls on the KVM lab: hosts registered with the lab CA's client certificate
(lab/pki.py) migrate a running guest peer-to-peer over TLS; an expired or foreign
certificate ends in a named error with its remedy, and nothing is registered or moved; a
certificate an administrator gives a host on its page is the one libvirt uses, and once it
expires the host is named unreachable for that reason."""

import shutil

import pytest
from django.urls import reverse

import lab as labkit
from hosts import services as host_services
from hosts import transport
from hosts.models import VM, Host
from kvmweb.audit.models import AuditEvent
from lab import pki
from migrations_app import runner
from migrations_app.models import MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight
from migrations_app.services import do_create_job

pytestmark = pytest.mark.lab


@pytest.fixture
def tls_lab(lab):
    """The lab, failing in one line when its libvirtd has no TLS listener."""
    try:
        labkit.require_tls(lab.hosts)
    except labkit.LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    return lab


@pytest.fixture
def tls_hosts(tls_lab, db):
    """lab-a and lab-b registered by qemu+tls (kvmweb's certificate: pki/client)."""
    lab = tls_lab
    return {h: host_services.do_register_host(h, labkit.uri(h, "tls"), sync=False) for h in lab.hosts}


def _preflight(guest, target, mode="live", options=None):
    vm = VM.objects.get(uuid=guest.uuid)
    plan = MigrationPlan(vm, vm.host, target, mode, dict(options or {}))
    return vm, run_preflight(plan, measure_dirty_rate=False)


def test_it_live_migrates_peer_to_peer_between_hosts_registered_over_tls(tls_hosts, lab_guest, admin):
    assert all(h.status == Host.REACHABLE and h.uri.startswith("qemu+tls://") for h in tls_hosts.values())
    guest = lab_guest("tls-live")
    assert not host_services.do_sync_inventory(tls_hosts["lab-a"])["error"]
    # Native TLS for the migration stream too (virsh migrate --tls: QEMU's own certificates).
    vm, report = _preflight(guest, tls_hosts["lab-b"], options={"tls": True})
    assert not report.fails, [(r.id, r.message) for r in report.fails]
    check = {r.id: r for r in report.results}["transport"]
    assert check.status == "pass" and "TLS" in check.message
    assert check.details["target_certificate"]["status"] == "ok" and check.details["source_files_verified"]
    before = labkit.read_counter("lab-a", guest)
    job = do_create_job(
        vm,
        tls_hosts["lab-b"],
        "live",
        {"tls": True},
        actor=admin,
        report=report,
        acknowledged=[r.id for r in report.warnings],
    )
    assert "--tls" in job.preflight["plan"]["virsh"]  # the plan ran with VIR_MIGRATE_TLS
    assert runner.run_job(job.pk) == MigrationJob.SUCCEEDED
    job.refresh_from_db()
    assert job.status == MigrationJob.SUCCEEDED and job.options.get("tls") is True, job.error
    assert labkit.where(guest) == {"lab-b": "running"}
    assert labkit.read_counter("lab-b", guest) >= before  # the RAM moved, no fresh boot
    assert VM.objects.get(uuid=guest.uuid).host.name == "lab-b"


@pytest.mark.parametrize(
    ("client", "problem", "said"),
    [("client-expired", "expired", "has expired"), ("client-foreign", "untrusted", "known issuer")],
)
def test_it_refuses_a_host_whose_tls_certificate_is_rejected_and_changes_nothing(
    tls_lab, db, admin, client, problem, said
):
    uri = labkit.uri("lab-b", "tls", client=client)
    with pytest.raises(host_services.HostError) as caught:
        host_services.do_register_host("lab-b", uri, actor=admin)
    assert said in str(caught.value) and "certificate" in str(caught.value)
    assert "Issue" in str(caught.value) or "CA" in str(caught.value)  # the remedy comes with it
    assert not Host.objects.exists() and not VM.objects.exists()
    event = AuditEvent.objects.get(action="host.register")
    assert event.outcome == AuditEvent.FAILURE and event.details["tls_problem"] == problem


def test_it_blocks_a_migration_when_the_target_certificate_has_expired(tls_hosts, lab_guest):
    guest = lab_guest("tls-exp", wait=False)
    assert not host_services.do_sync_inventory(tls_hosts["lab-a"])["error"]
    # The certificate kvmweb (and the source, peer to peer) uses for lab-b expires.
    Host.objects.filter(pk=tls_hosts["lab-b"].pk).update(
        uri=labkit.uri("lab-b", "tls", client="client-expired")
    )
    _vm, report = _preflight(guest, Host.objects.get(pk=tls_hosts["lab-b"].pk))
    fails = {r.id: r for r in report.fails}
    assert {"connection", "transport"} <= set(fails)
    assert "expired" in fails["transport"].message and "clientcert.pem" in fails["transport"].remedy
    assert "has expired" in fails["connection"].message and fails["connection"].remedy
    assert labkit.where(guest) == {"lab-a": "running"} and not MigrationJob.objects.exists()


def _pems(kind):
    d = pki.client_dir(labkit.LAB_DIR, kind)
    return {
        "ca_pem": (d / "cacert.pem").read_text(),
        "cert_pem": (d / "clientcert.pem").read_text(),
        "key_pem": (d / "clientkey.pem").read_text(),
    }


def test_it_connects_with_the_certificate_given_on_the_host_page_and_names_it_once_expired(
    tls_hosts, admin, login, settings, tmp_path
):
    settings.DATA_DIR = tmp_path
    host = tls_hosts["lab-b"]
    web = login(admin)
    url = reverse("hosts:certificate", args=[host.pk])
    assert web.post(url, _pems("client")).status_code == 302
    host.refresh_from_db()
    stored = transport.tls_files(host.uri)["cert"].parent
    assert stored.parent == transport.managed_pki_root()
    assert host_services.do_probe_host(host)  # lab-b's libvirtd accepted the stored certificate
    uri = host.uri
    # An expired certificate is refused when given: named, audited, nothing changed.
    response = web.post(url, _pems("client-expired"))
    assert response.status_code == 200 and "expired on" in response.content.decode()
    refused = AuditEvent.objects.get(action="host.tls_certificate", outcome=AuditEvent.FAILURE)
    assert "expired" in refused.details["reason"]
    # Time passes: the stored certificate expires (the lab CA's expired one in its place).
    for name in ("clientcert.pem", "clientkey.pem"):
        shutil.copy(pki.client_dir(labkit.LAB_DIR, "client-expired") / name, stored / name)
    vms = list(VM.objects.order_by("pk").values_list("uuid", "host_id"))
    assert not host_services.do_probe_host(host)
    host.refresh_from_db()
    assert host.status == Host.UNREACHABLE and host.uri == uri
    assert "TLS certificate expired" in host.last_error and "TLS certificate page" in host.last_error
    assert "tls-certificate-warning" in web.get(reverse("hosts:detail", args=[host.pk])).content.decode()
    assert "certificate not usable" in web.get(reverse("hosts:list")).content.decode()
    assert list(VM.objects.order_by("pk").values_list("uuid", "host_id")) == vms
    assert AuditEvent.objects.filter(action="host.status", outcome=AuditEvent.FAILURE).exists()


def test_it_adds_a_tls_host_with_a_certificate_pasted_in_the_wizard(
    tls_lab, db, admin, login, settings, tmp_path
):
    settings.DATA_DIR = tmp_path
    web = login(admin)
    address = labkit.ip("lab-b")
    response = web.post(reverse("hosts:certificate_new") + f"?address={address}", _pems("client"))
    assert response.status_code == 302
    page = web.get(response.url).content.decode()  # the wizard tests the connection with it
    assert 'class="step-fail"' not in page and "Register this host" in page, page[-3000:]
    [directory] = transport.managed_pki_root().iterdir()
    uri = transport.build_uri("tls", address, pkipath=str(directory))
    assert web.post(reverse("hosts:add"), {"name": "lab-b", "uri": uri}).status_code == 302
    host = Host.objects.get(name="lab-b")
    assert host.status == Host.REACHABLE and transport.managed_dir(host.uri) == directory
    event = AuditEvent.objects.get(action="host.tls_certificate")
    assert event.details["staged"] is True and event.actor == admin

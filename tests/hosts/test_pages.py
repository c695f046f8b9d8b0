"""Pages render for the right people, escape hostile names, and stay fast to fail."""

import time

import pytest
from django.urls import reverse

from hosts import services
from hosts.models import VM, Host

pytestmark = pytest.mark.django_db
XSS = "<script>alert(1)</script>"
XSS_VM = "<img src=x onerror=alert(1)>"


def test_it_sends_anonymous_users_to_login(client):
    for url in ("/", "/hosts/", "/vms/", "/hosts/add/"):
        response = client.get(url)
        assert response.status_code == 302 and response.url.startswith("/login/")


def test_it_lets_only_administrators_register_hosts(login, operator, admin):
    client = login(operator)
    assert client.get(reverse("hosts:add")).status_code == 403
    response = client.post(reverse("hosts:add"), {"name": "x", "uri": "test:///default"})
    assert response.status_code == 403 and not Host.objects.exists()
    client = login(admin)
    response = client.post(reverse("hosts:add"), {"name": "x", "uri": "test:///default"})
    host = Host.objects.get(name="x")
    assert response.status_code == 302 and host.status == Host.REACHABLE


def test_it_shows_the_uri_refusal_in_the_form(login, admin):
    response = login(admin).post(
        reverse("hosts:add"), {"name": "x", "uri": "qemu+ssh://h/system?command=/bin/sh"}
    )
    assert response.status_code == 200
    assert "Parameter &#x27;command&#x27; is refused" in response.content.decode()
    assert not Host.objects.exists()


def test_it_escapes_html_in_host_and_vm_names_everywhere(login, admin, node_xml):
    # libvirt refuses '/' in domain names, so the VM gets the slash-free classic.
    text = (
        node_xml("a")
        .read_text()
        .replace("<name>web1</name>", "<name>&lt;img src=x onerror=alert(1)&gt;</name>")
    )
    host = services.do_register_host(XSS, f"test://{node_xml('a', text)}")
    vm = VM.objects.get(name=XSS_VM)
    client = login(admin)
    for url in ("/", "/hosts/", f"/hosts/{host.pk}/", "/vms/", f"/vms/{vm.pk}/", f"/hosts/{host.pk}/edit/"):
        body = client.get(url).content.decode()
        assert XSS not in body and XSS_VM not in body, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, url
    body = client.get(f"/vms/{vm.pk}/").content.decode()
    assert "&lt;img src=x onerror=alert(1)&gt;" in body


def test_it_reports_a_closed_port_as_unreachable_quickly_and_pages_render(login, admin):
    started = time.monotonic()
    host = services.do_register_host("down", "qemu+tcp://127.0.0.1:1/system")
    elapsed = time.monotonic() - started
    assert host.status == Host.UNREACHABLE and "connection refused" in host.last_error.lower()
    assert elapsed < 2, elapsed
    client = login(admin)
    for url in ("/", "/hosts/", f"/hosts/{host.pk}/", "/vms/"):
        assert client.get(url).status_code == 200


def test_it_hides_out_of_scope_objects_with_404(login, mallory, alice, node_xml):
    host = services.do_register_host("a", f"test://{node_xml('a')}")
    web = VM.objects.get(name="web1")
    web.owner_user = alice
    web.save()
    client = login(mallory)
    assert client.get(f"/hosts/{host.pk}/").status_code == 404
    assert client.get(f"/vms/{web.pk}/").status_code == 404
    assert "web1" not in client.get("/vms/").content.decode()
    client = login(alice)
    assert client.get(f"/vms/{web.pk}/").status_code == 200
    db1 = VM.objects.get(name="db1")
    assert client.get(f"/vms/{db1.pk}/").status_code == 404
    body = client.get("/vms/").content.decode()
    assert "web1" in body and "db1" not in body


def test_it_filters_and_paginates_the_vm_list(login, admin, node_xml):
    services.do_register_host("a", f"test://{node_xml('a')}")
    client = login(admin)
    body = client.get("/vms/?state=shutoff").content.decode()
    assert "db1" in body and "web1" not in body
    body = client.get("/vms/?q=web").content.decode()
    assert "web1" in body and "db1" not in body


def test_it_never_names_hosts_outside_a_self_service_users_scope(login, alice, node_xml):
    # web1 ran on "secret-host", then moved to "a"; alice owns it and may see only "a".
    text = node_xml("a").read_text()
    secret = services.do_register_host("secret-host", f"test://{node_xml('s', text)}")
    web = VM.objects.get(name="web1")
    web.owner_user = alice
    web.save()
    secret.delete()
    services.do_register_host("a", f"test://{node_xml('a')}")
    VM.objects.filter(pk=web.pk).update(stale_hosts=["secret-host"])
    body = login(alice).get(f"/vms/{web.pk}/").content.decode()
    assert "secret-host" not in body
    assert "another host" in body  # the trail entry and the stale-copy warning are masked
    assert "seen on another host" in body
    assert "secret-host" not in login(alice).get("/vms/").content.decode()


def test_it_audits_a_failed_sync_against_the_person_who_asked(login, admin):
    host = services.do_register_host("down", "qemu+tcp://127.0.0.1:1/system", sync=False)
    response = login(admin).post(f"/hosts/{host.pk}/sync/")
    assert response.status_code == 302
    from kvmweb.audit.models import AuditEvent

    event = AuditEvent.objects.get(action="inventory.sync")
    assert event.actor == admin and event.outcome == AuditEvent.FAILURE
    assert "connection refused" in event.details["error"].lower()

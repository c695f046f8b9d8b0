"""VM ownership: set by administrators on one VM or many, audited per VM, kept across moves."""

import pytest
from django.urls import reverse

from hosts import services
from hosts import services as host_services
from hosts.models import VM
from kvmweb.audit.models import AuditEvent
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return build(alice, bob)


def test_it_sets_the_owner_of_one_vm_and_audits_before_and_after(world, login, admin, bob):
    url = reverse("hosts:vm_owner", args=[world.hidden.pk])
    client = login(admin)
    assert client.get(url).status_code == 200
    response = client.post(url, {"owner_user": str(bob.pk), "owner_group": str(world.team.pk)})
    assert response.status_code == 302 and response.url == reverse("hosts:vm_detail", args=[world.hidden.pk])
    world.hidden.refresh_from_db()
    assert world.hidden.owner_user == bob and world.hidden.owner_group == world.team
    event = AuditEvent.objects.get(action="vm.owner")
    assert event.actor == admin and event.target_id == str(world.hidden.pk)
    assert event.details == {
        "before": {"user": None, "group": None},
        "after": {"user": "bob", "group": "team-a"},
    }
    # bob now sees it; clearing it hides it again.
    assert VM.objects.restrict(bob).filter(pk=world.hidden.pk).exists()
    client.post(url, {"owner_user": "none", "owner_group": "none"})
    assert not VM.objects.restrict(bob).filter(pk=world.hidden.pk).exists()
    assert AuditEvent.objects.filter(action="vm.owner").count() == 2


def test_it_sets_owners_in_bulk_from_a_filtered_list(world, login, admin, alice):
    client = login(admin)
    page = client.get(reverse("hosts:bulk_owner"), {"group": world.prod.pk}).content.decode()
    assert "alice-web" in page and "bob-db" in page and "hidden-vm" not in page
    page = client.get(reverse("hosts:bulk_owner"), {"owner": "team"}).content.decode()
    assert "team-app" in page and "alice-web" not in page
    page = client.get(reverse("hosts:bulk_owner"), {"unowned": "on"}).content.decode()
    assert "hidden-vm" in page and "alice-web" not in page
    response = client.post(
        reverse("hosts:bulk_owner") + f"?group={world.prod.pk}",
        {
            "vm": [world.bob_db.pk, world.hidden.pk, 999999],
            "owner_user": str(alice.pk),
            "owner_group": "keep",
        },
    )
    assert response.status_code == 302
    assert set(VM.objects.filter(owner_user=alice).values_list("name", flat=True)) == {
        "alice-web",
        "bob-db",
        "hidden-vm",
    }
    events = AuditEvent.objects.filter(action="vm.owner").order_by("id")
    assert [e.target_name for e in events] == ["bob-db", "hidden-vm"]
    assert events[0].details["before"] == {"user": "bob", "group": None}
    assert events[0].details["after"] == {"user": "alice", "group": None}


def test_it_writes_no_event_when_nothing_changes(world, admin):
    changed = services.do_set_owner([world.alice_web], owner_user=world.alice_web.owner_user, actor=admin)
    assert changed == 0 and not AuditEvent.objects.filter(action="vm.owner").exists()


def test_it_refuses_owner_pages_to_everyone_but_administrators(
    world, login, operator, auditor, alice, mallory
):
    url = reverse("hosts:vm_owner", args=[world.alice_web.pk])
    for user in (operator, auditor, alice):
        client = login(user)
        assert client.get(url).status_code == 403
        assert client.post(url, {"owner_user": "none", "owner_group": "none"}).status_code == 403
        assert client.post(reverse("hosts:bulk_owner"), {"vm": [world.alice_web.pk]}).status_code == 403
    # Outsiders and other owners do not learn the VM exists.
    assert login(mallory).get(url).status_code == 404
    assert login(alice).get(reverse("hosts:vm_owner", args=[world.hidden.pk])).status_code == 404
    world.alice_web.refresh_from_db()
    assert world.alice_web.owner_user == alice
    assert not AuditEvent.objects.filter(action="vm.owner").exists()


def test_it_offers_no_role_group_as_owner(world, login, admin):
    body = login(admin).get(reverse("hosts:vm_owner", args=[world.hidden.pk])).content.decode()
    assert "team-a" in body and ">Self-service<" not in body and ">Administrator<" not in body


def test_it_keeps_the_owner_when_the_vm_moves(node_xml, admin, alice):
    text = node_xml("a").read_text()
    host_services.do_register_host("a", f"test://{node_xml('a')}")
    web = VM.objects.get(name="web1")
    services.do_set_owner([web], owner_user=alice, actor=admin)
    start = text.index('<domain type="test">')
    end = text.index("</domain>", start) + len("</domain>")
    node_xml("a", text[:start] + text[end:])
    b_text = text.replace("555555555502", "555555555592").replace("555555555503", "555555555593")
    b = host_services.do_register_host("b", f"test://{node_xml('b', b_text)}")
    web.refresh_from_db()
    assert web.host == b and web.owner_user == alice
    assert VM.objects.restrict(alice).filter(pk=web.pk).exists()

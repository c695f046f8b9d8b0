"""Administration pages: roles, host groups, self-service policies. Each change audited."""

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from hosts.models import Host
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.accounts.roles import ADMINISTRATOR, AUDITOR, OPERATOR, has_role
from kvmweb.audit.models import AuditEvent
from migrations_app import services
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return build(alice, bob)


def test_it_assigns_roles_and_audits_the_change(login, admin, mallory):
    client = login(admin)
    assert "mallory" in client.get(reverse("accounts:users")).content.decode()
    url = reverse("accounts:user_roles", args=[mallory.pk])
    response = client.post(url, {"roles": [AUDITOR, OPERATOR], "active": "on"})
    assert response.status_code == 302
    mallory = User.objects.get(pk=mallory.pk)
    assert has_role(mallory, AUDITOR) and has_role(mallory, OPERATOR)
    event = AuditEvent.objects.get(action="user.roles")
    assert event.actor == admin and event.target_name == "mallory"
    assert event.details == {"before": [], "after": [AUDITOR, OPERATOR]}


def test_it_creates_a_user_with_roles(login, admin):
    client = login(admin)
    data = {"username": "carol", "password": "a long enough passphrase 42", "roles": [AUDITOR]}
    assert client.post(reverse("accounts:user_add"), data).status_code == 302
    carol = User.objects.get(username="carol")
    assert carol.check_password(data["password"]) and has_role(carol, AUDITOR)
    created = AuditEvent.objects.get(action="user.create")
    assert created.actor == admin and created.details == {"roles": [AUDITOR]}
    assert "passphrase" not in str(created.details)
    assert AuditEvent.objects.get(action="user.roles").details["after"] == [AUDITOR]
    # Weak passwords and taken names are refused.
    response = client.post(reverse("accounts:user_add"), {"username": "dave", "password": "password"})
    assert response.status_code == 200 and not User.objects.filter(username="dave").exists()
    response = client.post(reverse("accounts:user_add"), dict(data, roles=[]))
    assert response.status_code == 200 and "exists already" in response.content.decode()
    assert AuditEvent.objects.get(action="user.create", outcome=AuditEvent.FAILURE).target_name == "carol"


def test_it_disables_an_account_and_ends_its_sessions(login, admin, alice, client):
    from django.test import Client

    alice_client = Client()
    alice_client.force_login(alice)
    assert alice_client.get(reverse("dashboard")).status_code == 200
    response = login(admin).post(reverse("accounts:user_roles", args=[alice.pk]), {"roles": ["Self-service"]})
    assert response.status_code == 302
    assert not User.objects.get(pk=alice.pk).is_active
    event = AuditEvent.objects.get(action="user.roles")
    assert event.details["active"] == [True, False]
    response = alice_client.get(reverse("dashboard"))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_it_keeps_the_last_administrator_and_audits_the_refusal(login, admin):
    url = reverse("accounts:user_roles", args=[admin.pk])
    response = login(admin).post(url, {"roles": [AUDITOR], "active": "on"})
    assert response.status_code == 200 and "last administrator" in response.content.decode()
    response = login(admin).post(url, {"roles": [ADMINISTRATOR]})  # disabling: same refusal
    assert response.status_code == 200 and User.objects.get(pk=admin.pk).is_active
    assert has_role(User.objects.get(pk=admin.pk), ADMINISTRATOR)
    events = AuditEvent.objects.filter(action="user.roles")
    assert [e.outcome for e in events] == [AuditEvent.FAILURE] * 2
    assert {e.details["reason"] for e in events} == {"last administrator"}


def test_it_refuses_role_pages_to_non_administrators(login, operator, auditor, alice, mallory, bob):
    body = login(auditor).get(reverse("accounts:users")).content.decode()  # auditors read it
    assert "mallory" in body and reverse("accounts:user_roles", args=[bob.pk]) not in body
    assert login(operator).get(reverse("accounts:users")).status_code == 403
    for user in (operator, auditor):
        client = login(user)
        assert (
            client.post(reverse("accounts:user_roles", args=[bob.pk]), {"roles": [ADMINISTRATOR]}).status_code
            == 403
        )
    client = login(mallory)
    assert client.get(reverse("accounts:users")).status_code == 403
    # Other accounts are out of mallory's scope: 404, not a hint that they exist.
    assert (
        client.post(reverse("accounts:user_roles", args=[bob.pk]), {"roles": [ADMINISTRATOR]}).status_code
        == 404
    )
    assert (
        client.post(reverse("accounts:user_roles", args=[mallory.pk]), {"roles": [ADMINISTRATOR]}).status_code
        == 403
    )
    assert not has_role(User.objects.get(pk=mallory.pk), ADMINISTRATOR)
    assert not AuditEvent.objects.filter(action="user.roles").exists()


def test_it_creates_host_groups_and_moves_hosts_into_them(world, login, admin):
    client = login(admin)
    response = client.post(
        reverse("hosts:group_add"),
        {"name": "edge", "description": "edge sites", "hosts": [world.p1.pk]},
    )
    assert response.status_code == 302
    assert Host.objects.get(pk=world.p1.pk).group.name == "edge"
    event = AuditEvent.objects.get(action="hostgroup.create")
    assert event.details["hosts_added"] == ["p1-prod-host"] and event.target_name == "edge"
    # Duplicate names are refused and audited as a failure.
    response = client.post(reverse("hosts:group_add"), {"name": "dev"})
    assert response.status_code == 200 and "exists already" in response.content.decode()
    failed = AuditEvent.objects.get(action="hostgroup.create", outcome=AuditEvent.FAILURE)
    assert failed.target_name == "dev"


def test_it_deletes_a_group_and_keeps_its_hosts(world, login, admin):
    response = login(admin).post(reverse("hosts:group_delete", args=[world.prod.pk]))
    assert response.status_code == 302
    assert Host.objects.get(pk=world.p1.pk).group is None
    assert not SelfServicePolicy.objects.exists()  # the policy went with its group
    assert AuditEvent.objects.get(action="hostgroup.delete").details == {"hosts": ["p1-prod-host"]}


def test_it_edits_a_policy_and_audits_the_rule(world, login, admin):
    url = reverse("migrations:policy_edit", args=[world.policy.pk])
    response = login(admin).post(
        url,
        {
            "source_group": world.prod.pk,
            "target_groups": [world.dev.pk, world.secret.pk],
            "allowed_modes": ["live", "cold"],
            "max_bandwidth": "",
            "requires_approval": "",
        },
    )
    assert response.status_code == 302
    policy = SelfServicePolicy.objects.get()
    assert policy.allowed_modes == ["live", "cold"] and policy.max_bandwidth is None
    assert not policy.requires_approval
    event = AuditEvent.objects.get(action="policy.change")
    assert event.details["before"]["max_bandwidth"] == 100
    assert event.details["after"] == {
        "source_group": "prod",
        "target_groups": ["dev", "secret"],
        "allowed_modes": ["live", "cold"],
        "max_bandwidth": None,
        "requires_approval": False,
    }


def test_it_allows_one_policy_per_source_group(world, admin):
    with pytest.raises(services.PolicyError):
        services.do_save_policy(
            None, source_group=world.prod, target_groups=[], allowed_modes=[], actor=admin
        )
    assert SelfServicePolicy.objects.count() == 1
    assert AuditEvent.objects.get(action="policy.create").outcome == AuditEvent.FAILURE


def test_it_shows_policies_to_staff_and_hides_them_from_others(
    world, login, operator, auditor, alice, mallory
):
    for user in (operator, auditor):
        body = login(user).get(reverse("hosts:groups")).content.decode()
        assert "prod" in body and "100 MiB/s" in body
        assert (
            login(user).post(reverse("migrations:policy_delete", args=[world.policy.pk])).status_code == 403
        )
    for user in (alice, mallory):
        assert login(user).get(reverse("hosts:groups")).status_code == 403
        assert login(user).get(reverse("migrations:policy_edit", args=[world.policy.pk])).status_code == 404
        assert login(user).get(reverse("hosts:group_edit", args=[world.prod.pk])).status_code == 404
    assert SelfServicePolicy.objects.exists()

"""A VM's history on its page: location trail, its jobs, and the audit events on it and
its jobs, each within the viewer's scope."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from hosts import services
from hosts.models import VMLocation
from kvmweb.audit import record
from migrations_app.models import MigrationJob
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob, admin, operator):
    w = build(alice, bob)
    now = timezone.now()
    VMLocation.objects.create(vm=w.alice_web, host=w.s1, host_name="s1-secret", at=now - timedelta(days=3))
    VMLocation.objects.create(vm=w.alice_web, host=w.d1, host_name="d1-dev-host", at=now - timedelta(days=2))
    VMLocation.objects.create(
        vm=w.alice_web, host=w.p1, host_name="p1-prod-host", at=now - timedelta(days=1), via="migration"
    )
    w.old_job = MigrationJob.objects.create(
        vm=w.alice_web,
        vm_name="alice-web",
        source=w.s1,
        source_name="s1-secret",
        target=w.d1,
        target_name="d1-dev-host",
        mode=MigrationJob.COLD,
        status=MigrationJob.SUCCEEDED,
        requested_by=operator,
        requested_by_name="operator",
    )
    w.job = MigrationJob.objects.create(
        vm=w.alice_web,
        vm_name="alice-web",
        source=w.d1,
        source_name="d1-dev-host",
        target=w.p1,
        target_name="p1-prod-host",
        mode=MigrationJob.LIVE,
        status=MigrationJob.SUCCEEDED,
        requested_by=operator,
        requested_by_name="operator",
    )
    services.do_set_owner([w.alice_web], owner_group=w.team, actor=admin)
    with transaction.atomic():
        record("migration.finish", actor=operator, target=w.job, details={"downtime_ms": 42})
        record("migration.finish", actor=alice, target=w.old_job)
        record("vm.note", actor=alice, target=w.alice_web, details={"by": "alice"})
        record("vm.note", actor=admin, target=w.hidden)  # another VM: not in this history
    return w


def history(client, vm):
    response = client.get(reverse("hosts:vm_detail", args=[vm.pk]))
    assert response.status_code == 200
    body = response.content.decode()
    return body[body.index('id="vm-history"') :]


def test_it_shows_staff_the_trail_the_jobs_and_every_event(world, login, auditor):
    body = history(login(auditor), world.alice_web)
    assert "seen on p1-prod-host (migration)" in body and "seen on d1-dev-host (sync)" in body
    assert "seen on s1-secret (sync)" in body and "s1-secret → d1-dev-host" in body
    assert reverse("migrations:detail", args=[world.job.pk]) in body
    assert "succeeded" in body
    # Known actions in words, unknown codes as they are.
    for action in ("VM owner changed", "Migration finished", "vm.note"):
        assert action in body
    assert body.count("vm.note") == 1  # the hidden VM's event is not this VM's history
    assert f"{reverse('audit:list')}?target=hosts.vm:{world.alice_web.pk}" in body
    # Newest first across trail and events.
    assert body.index("vm.note") < body.index("seen on p1-prod-host")


def test_it_shows_owners_only_their_own_actions_and_no_audit_links(world, login, alice):
    body = history(login(alice), world.alice_web)
    assert "seen on p1-prod-host" in body and "succeeded" in body
    assert "vm.note" in body  # her own action
    assert "VM owner changed" not in body  # others' events
    assert body.count("Migration finished") == 1 and f"job #{world.old_job.pk}" in body
    # Where the VM was before it was hers is none of her business.
    assert "s1-secret" not in body and "seen on another host (sync)" in body
    assert "another host → d1-dev-host" in body
    assert reverse("audit:list") not in body and "/audit/" not in body
    assert "Change owner" not in body


def test_it_offers_administrators_the_owner_change(world, login, admin):
    body = history(login(admin), world.alice_web)
    assert reverse("hosts:vm_owner", args=[world.alice_web.pk]) in body

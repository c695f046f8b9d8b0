"""The audit pages speak in words: what happened, which object (linked only when the
viewer may open it), details as tables with the raw JSON one click away."""

import uuid

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from hosts.models import VM, Host
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from migrations_app.models import MigrationJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(admin, alice):
    host = Host.objects.create(name="kvm-a", uri="test:///a")
    vm = VM.objects.create(uuid=uuid.uuid4(), name="demo-web", host=host, state="running")
    job = MigrationJob.objects.create(
        vm=vm, vm_name=vm.name, source=host, source_name=host.name, target=host, target_name="kvm-b",
        mode=MigrationJob.LIVE, status=MigrationJob.SUCCEEDED, requested_by_name="admin",
    )  # fmt: skip
    with transaction.atomic():
        events = {
            "job": record(
                "migration.request",
                actor=admin,
                target=job,
                details={"plan": {"mode": "live", "flags": ["LIVE", "PEER2PEER"]}, "reason": "<b>patch</b>"},
            ),
            "power": record(
                "vm.power", actor=admin, target=vm, details={"action": "destroy", "state_before": "running"}
            ),
            "gone_host": record(
                "host.remove", actor=admin, target_type="hosts.host", target_id="999", target_name="old-kvm"
            ),
            "user": record("user.roles", actor=admin, target=alice, details={"roles": ["Self-service"]}),
        }
    return {"host": host, "vm": vm, "job": job, **events}


def row(body, event):
    return body.split(f'href="/audit/{event.pk}/"')[1].split("</tr>")[0]


def test_it_names_actions_and_objects_in_words_with_links(world, login, admin):
    body = login(admin).get(reverse("audit:list")).content.decode()
    job_row = row(body, world["job"])
    assert "Migration requested" in job_row and 'title="migration.request"' in job_row
    # world["job"] is the audit event about the job; its target_id is the job's id.
    assert f"Migration job #{world['job'].target_id} of demo-web" in job_row
    assert f'href="{reverse("migrations:detail", args=[world["job"].target_id])}"' in job_row
    power_row = row(body, world["power"])
    assert "VM forced off" in power_row and "VM demo-web" in power_row
    assert f'href="{reverse("hosts:vm_detail", args=[world["vm"].pk])}"' in power_row
    # An object that no longer exists is named, not linked.
    gone_row = row(body, world["gone_host"])
    assert "Host removed" in gone_row and "Host old-kvm" in gone_row and "/hosts/999/" not in gone_row
    assert f'href="{reverse("accounts:user_roles", args=[world["user"].target_id])}"' in row(
        body, world["user"]
    )


def test_it_links_only_what_the_viewer_may_open(world, login, auditor):
    # Auditors read every event but may not edit accounts: the user is named, not linked.
    body = login(auditor).get(reverse("audit:list")).content.decode()
    assert "User alice" in row(body, world["user"]) and "/roles/" not in row(body, world["user"])
    assert reverse("hosts:vm_detail", args=[world["vm"].pk]) in row(body, world["power"])


def test_it_shows_details_as_tables_with_the_raw_json_a_click_away(world, login, auditor):
    body = login(auditor).get(reverse("audit:detail", args=[world["job"].pk])).content.decode()
    assert "<th>Mode</th><td>live</td>" in body and "LIVE, PEER2PEER" in body
    assert "<th>Reason</th><td>&lt;b&gt;patch&lt;/b&gt;</td>" in body  # escaped
    assert '<details class="raw" data-testid="raw-json"><summary>' in body
    assert "&quot;reason&quot;: &quot;&lt;b&gt;patch&lt;/b&gt;&quot;" in body
    assert f"Migration job #{world['job'].target_id} of demo-web" in body


def test_it_labels_a_page_of_events_in_a_fixed_number_of_queries(world, login, operator, admin):
    client = login(operator)

    def count():
        client.get(reverse("audit:list"))
        with CaptureQueriesContext(connection) as ctx:
            client.get(reverse("audit:list"))
        return len(ctx.captured_queries)

    before = count()
    with transaction.atomic():
        for i in range(30):
            vm = VM.objects.create(uuid=uuid.uuid4(), name=f"vm-{i}", host=world["host"])
            record("vm.power", actor=admin, target=vm, details={"action": "start"})
    assert count() == before
    assert AuditEvent.objects.count() == 34

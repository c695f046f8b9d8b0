"""The audit page: filters, one event's details, CSV and JSON exports, who may read it."""

import csv
import io
import json
from datetime import timedelta
from unittest import mock

import pytest
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def ev(action, actor=None, outcome=AuditEvent.SUCCESS, **kw):
    with transaction.atomic():
        return record(action, actor=actor, outcome=outcome, **kw)


@pytest.fixture
def history(admin, operator, alice):
    return {
        "register": ev("host.register", admin, target_type="hosts.host", target_id="1", target_name="kvm-a"),
        "failed": ev(
            "host.register",
            admin,
            AuditEvent.FAILURE,
            target_type="hosts.host",
            target_name="bad",
            details={"error": "Parameter 'command' is refused"},
        ),
        "owner": ev("vm.owner", admin, target_type="hosts.vm", target_id="7", target_name="web1"),
        "migrate": ev(
            "migration.request",
            alice,
            target_type="migrations_app.migrationjob",
            target_id="3",
            target_name="#3 web1 a -> b (live)",
            details={
                "virsh": "virsh migrate --live web1",
                "preflight": {
                    "checks": [{"name": "memory", "status": "pass", "message": "enough", "remedy": ""}]
                },
                "result": {"downtime_ms": 12, "elapsed_ms": 3400},
            },
        ),
        "denied": ev(
            "auth.login", None, AuditEvent.DENIED, target_type="auth.user", target_name="=cmd|' /C calc'!A0"
        ),
    }


def listed(client, **params):
    response = client.get(reverse("audit:list"), params)
    assert response.status_code == 200
    return [e.pk for e in response.context["page"].object_list]


def test_it_filters_by_who_what_object_when_and_outcome(history, login, auditor):
    client = login(auditor)
    h = history
    assert listed(client, who="alice") == [h["migrate"].pk]
    assert listed(client, action="host.") == [h["failed"].pk, h["register"].pk]
    assert listed(client, target="hosts.vm:7") == [h["owner"].pk]
    assert listed(client, target="web1") == [h["migrate"].pk, h["owner"].pk]
    assert listed(client, outcome="failure") == [h["failed"].pk]
    today = timezone.localdate()
    assert len(listed(client, since=today.isoformat(), until=today.isoformat())) == 5
    assert listed(client, until=(today - timedelta(days=1)).isoformat()) == []


def test_it_shows_who_what_object_when_address_and_outcome(history, login, operator):
    body = login(operator).get(reverse("audit:list")).content.decode()
    for text in ("host.register", "kvm-a", "alice", "migration.request", "failure", "denied"):
        assert text in body


def test_it_shows_one_event_with_its_plan_preflight_and_statistics(history, login, auditor):
    response = login(auditor).get(reverse("audit:detail", args=[history["migrate"].pk]))
    body = response.content.decode()
    assert response.status_code == 200
    assert "Preflight" in body and "Final statistics" in body
    assert "&quot;downtime_ms&quot;: 12" in body  # pretty-printed JSON, escaped
    assert "virsh migrate --live web1" in body
    assert history["migrate"].hash in body


def test_it_exports_the_filtered_set_as_csv_with_formulas_defused(history, login, auditor):
    response = login(auditor).get(reverse("audit:export_csv"), {"action": "auth."})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response.streaming
    text = b"".join(response.streaming_content).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in rows] == [str(history["denied"].pk)]
    assert rows[0]["target_name"] == "'=cmd|' /C calc'!A0"
    assert rows[0]["outcome"] == "denied" and rows[0]["hash"] == history["denied"].hash
    # The export itself is history.
    export = AuditEvent.objects.get(action="audit.export")
    assert export.actor == auditor and export.details == {"format": "csv", "filters": {"action": "auth."}}


def test_it_exports_the_filtered_set_as_json(history, login, admin):
    response = login(admin).get(reverse("audit:export_json"), {"outcome": "success", "who": "admin"})
    data = json.loads(b"".join(response.streaming_content))
    assert [row["id"] for row in data] == [history["owner"].pk, history["register"].pk]
    assert data[1]["target_name"] == "kvm-a" and data[1]["actor_name"] == "admin"


def test_it_exports_large_sets_in_chunks(login, auditor, admin):
    with transaction.atomic():
        for i in range(1200):
            record("bulk.test", actor=admin, target_name=f"=x{i}")
    response = login(auditor).get(reverse("audit:export_csv"), {"action": "bulk."})
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode("utf-8-sig"))))
    assert len(rows) == 1201 and all(r[7].startswith("'=") for r in rows[1:])


def test_it_lets_only_staff_read_the_history(history, login, alice, bob, mallory, auditor):
    for user in (alice, mallory):
        client = login(user)
        for name in ("audit:list", "audit:export_csv", "audit:export_json"):
            assert client.get(reverse(name)).status_code == 403
    # alice's own event is in her scope (403: no right to read the history); others' are 404.
    assert login(alice).get(reverse("audit:detail", args=[history["migrate"].pk])).status_code == 403
    assert login(alice).get(reverse("audit:detail", args=[history["owner"].pk])).status_code == 404
    assert login(bob).get(reverse("audit:detail", args=[history["migrate"].pk])).status_code == 404
    assert not AuditEvent.objects.filter(action="audit.export").exists()


def test_it_pages_the_history(login, auditor, admin):
    with transaction.atomic():
        for _ in range(120):
            record("bulk.test", actor=admin)
    client = login(auditor)
    first = client.get(reverse("audit:list"), {"action": "bulk."}).context["page"]
    third = client.get(reverse("audit:list"), {"action": "bulk.", "page": 3}).context["page"]
    assert first.paginator.count == 120 and len(first.object_list) == 50 and len(third.object_list) == 20


def test_it_keeps_time_filters_in_the_current_timezone(login, auditor, admin):
    with mock.patch("django.utils.timezone.now", return_value=timezone.now() - timedelta(days=3)):
        old = ev("old.event", admin)
    assert listed(login(auditor), until=(timezone.localdate() - timedelta(days=2)).isoformat()) == [old.pk]

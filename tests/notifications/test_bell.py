"""The header's bell: a user's own jobs that ended or were decided, and requests waiting
for their approval; scoped like the job pages; "mark read" moves the user's mark (audited)."""

import pytest
from django.db import transaction
from django.urls import reverse

from hosts.models import VM, Host
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from migrations_app.models import MigrationJob
from notifications import inbox
from notifications.models import InboxMark


@pytest.fixture
def jobs(db, alice, bob):
    a = Host.objects.create(name="ha", uri="test:///default")
    b = Host.objects.create(name="hb", uri="test:///other")

    def job(name, owner, status):
        vm = VM.objects.create(
            uuid=f"6695eb01-f6a4-8304-79aa-{VM.objects.count() + 1:012d}",
            name=name,
            host=a,
            state="running",
            owner_user=owner,
        )
        return MigrationJob.objects.create(
            vm=vm,
            vm_name=name,
            source=a,
            source_name=a.name,
            target=b,
            target_name=b.name,
            mode="live",
            status=status,
            requested_by=owner,
            requested_by_name=owner.username,
        )

    return {
        "alice_done": job("alice-web", alice, MigrationJob.FAILED),
        "bob_done": job("bob-db", bob, MigrationJob.SUCCEEDED),
        "alice_waiting": job("alice-app", alice, MigrationJob.PENDING_APPROVAL),
    }


def _audit(action, job, actor=None, **details):
    with transaction.atomic():
        return record(action, actor=actor, target=job, details=details)


def test_it_lists_a_users_finished_jobs_and_nobody_elses(jobs, alice, bob, login):
    _audit("migration.finish", jobs["alice_done"], status="failed", error="boom")
    _audit("migration.finish", jobs["bob_done"], status="succeeded")
    page = login(alice).get(reverse("notifications:bell"))
    html = page.content.decode()
    assert page.status_code == 200 and page.context["unread"] == 1
    assert "alice-web" in html and "failed" in html and "bob-db" not in html
    assert [i.kind for i in inbox.items(bob)] == ["job.succeeded"]


def test_it_shows_waiting_requests_to_approvers_only(jobs, alice, operator, auditor):
    _audit("migration.request", jobs["alice_waiting"], actor=alice, status="pending_approval")
    assert [i.kind for i in inbox.items(operator)] == ["approval.requested"]
    assert inbox.items(auditor) == []  # sees the job, may not approve it
    assert inbox.items(alice) == []  # her own request is not news to her


def test_it_marks_read_and_audits_it(jobs, alice, login):
    event = _audit("migration.finish", jobs["alice_done"], status="failed")
    client = login(alice)
    response = client.post(reverse("notifications:mark_read"), {"up_to": event.pk}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and response.context["unread"] == 0
    assert InboxMark.objects.get(user=alice).seen_event_id == event.pk
    read = AuditEvent.objects.get(action="notifications.read")
    assert read.actor == alice and read.details["up_to"] == event.pk
    # Never backwards (an older tab marking later keeps the newer mark).
    client.post(reverse("notifications:mark_read"), {"up_to": 1})
    assert InboxMark.objects.get(user=alice).seen_event_id == event.pk
    newer = _audit("migration.finish", jobs["alice_done"], status="cancelled")
    assert [(i.event_id, i.unread) for i in inbox.items(alice)] == [(newer.pk, True), (event.pk, False)]


def test_it_sends_the_reader_back_only_to_a_page_of_this_site(jobs, alice, login):
    client = login(alice)
    url = reverse("notifications:mark_read")
    assert client.post(url, {"next": "/migrations/"})["Location"] == "/migrations/"
    assert client.post(url, {"next": "https://evil.example/"})["Location"] == reverse("dashboard")
    assert client.post(url, {"next": reverse("notifications:bell")})["Location"] == reverse("dashboard")


def test_it_loads_the_bell_through_the_socket_on_every_page(jobs, alice, login):
    html = login(alice).get(reverse("migrations:list")).content.decode()
    # The page itself reads no notification: the socket's snapshot fills the bell, and
    # bell.js fetches it over HTTP only while the socket is down.
    assert 'ws-connect="/ws/notifications/"' in html and 'hx-trigger="bell-refresh"' in html
    assert "js/bell.js" in html and "bell-count" not in html


def _host_status(host, was, to, error=""):
    details = {"from": was, "to": to} | ({"error": error} if error else {})
    return _audit("host.status", host, **details)


def test_it_tells_of_hosts_going_and_coming_back_to_those_who_see_them(jobs, alice, bob, operator, mallory):
    ha, hb = Host.objects.get(name="ha"), Host.objects.get(name="hb")
    gone = _host_status(ha, "reachable", "unreachable", "connection refused")
    back = _host_status(ha, "unreachable", "reachable")
    hidden = _host_status(hb, "unknown", "unreachable", "no route")  # no self-service VM on hb
    _host_status(hb, "unknown", "reachable")  # a first probe is no news
    expected = [(back.pk, "host.back"), (gone.pk, "host.unreachable")]
    assert [(i.event_id, i.kind) for i in inbox.items(operator)] == [
        (hidden.pk, "host.unreachable")
    ] + expected
    for owner in (alice, bob):  # their VMs run on ha; hb is outside their scope
        assert [(i.event_id, i.kind) for i in inbox.items(owner) if i.kind.startswith("host.")] == expected
    assert inbox.items(mallory) == []
    texts = [i.text for i in inbox.items(alice) if i.kind.startswith("host.")]
    assert texts == ["Host ha is reachable again.", "Host ha is unreachable."]

"""Notifications: events from the audit history to real receivers (a signed webhook, an
SMTP server), scope of personal subscriptions, retries with backoff, idempotency."""

import pytest
from django.db import transaction
from django.utils import timezone

from hosts.models import Host
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from migrations_app.models import MigrationJob
from notifications import dispatch, services
from notifications.models import Delivery, Subscription
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return build(alice, bob)


def finish(job, status, **details):
    """What the runner writes when a job ends: the row, then its migration.finish event."""
    MigrationJob.objects.filter(pk=job.pk).update(status=status, finished_at=timezone.now(), **details)
    job.refresh_from_db()
    with transaction.atomic():
        record(
            "migration.finish",
            target=job,
            outcome=AuditEvent.SUCCESS if status == "succeeded" else AuditEvent.FAILURE,
            details={
                "job": job.pk,
                "vm": job.vm_name,
                "source": job.source_name,
                "target": job.target_name,
                "mode": job.mode,
                "status": status,
                "error": "" if status == "succeeded" else "it broke",
                "downtime_ms": job.downtime_ms,
            },
        )
    return job


def job_for(vm, target, **fields):
    return MigrationJob.objects.create(
        vm=vm,
        vm_name=vm.name,
        source=vm.host,
        source_name=vm.host.name,
        target=target,
        target_name=target.name,
        mode="live",
        status="running",
        **fields,
    )


def test_it_delivers_a_signed_webhook_once_per_event(admin, world, webhook):
    sub = services.do_subscribe(
        admin, name="ops hook", kind="webhook", target=webhook.url, events=["job.succeeded"], is_global=True
    )
    webhook.secret = sub.secret
    job = finish(job_for(world.alice_web, world.d1), "succeeded", downtime_ms=40, elapsed_ms=3000)
    assert dispatch.dispatch() == {"created": 1, "sent": 1, "failed": 0}
    assert len(webhook.requests) == 1
    got = webhook.requests[0]
    assert got["verified"] and got["event"] == "job.succeeded"
    assert got["body"]["job"]["id"] == job.pk and got["body"]["job"]["api_url"] == f"/api/v1/jobs/{job.pk}/"
    delivery = Delivery.objects.get()
    assert delivery.status == "sent" and delivery.last_status_code == 200 and delivery.attempts == 1
    # Nothing new: nothing more is sent; a second collect of the same events makes no copy.
    assert dispatch.dispatch() == {"created": 0, "sent": 0, "failed": 0}
    dispatch.Cursor.objects.filter(name="audit").update(position=0)
    dispatch.collect()
    assert Delivery.objects.count() == 1 and len(webhook.requests) == 1
    assert AuditEvent.objects.get(action="notification.subscribe").actor == admin


def test_it_retries_with_backoff_and_keeps_each_status_code(admin, world, webhook, monkeypatch):
    sub = services.do_subscribe(
        admin, name="flaky", kind="webhook", target=webhook.url, events=["job.failed"], is_global=True
    )
    webhook.secret = sub.secret
    webhook.statuses = [500, 503]
    monkeypatch.setattr(dispatch, "BACKOFF", [0, 0, 0])
    finish(job_for(world.alice_web, world.d1), "failed")
    dispatch.dispatch()
    delivery = Delivery.objects.get()
    assert delivery.status == "pending" and delivery.attempts == 1 and delivery.last_status_code == 500
    dispatch.dispatch()
    dispatch.dispatch()
    delivery.refresh_from_db()
    assert delivery.status == "sent" and delivery.attempts == 3
    assert [a["status_code"] for a in delivery.attempts_log] == [500, 503, 200]
    assert all(r["verified"] for r in webhook.requests)


def test_it_gives_up_after_the_last_backoff(admin, world, monkeypatch):
    services.do_subscribe(
        admin,
        name="dead",
        kind="webhook",
        target="http://127.0.0.1:9/none",
        events=["job.failed"],
        is_global=True,
    )
    monkeypatch.setattr(dispatch, "BACKOFF", [0, 0])
    finish(job_for(world.alice_web, world.d1), "failed")
    for _ in range(4):
        dispatch.dispatch()
    delivery = Delivery.objects.get()
    assert delivery.status == "failed" and delivery.attempts == 3 and delivery.last_error


def test_it_mails_a_self_service_user_only_about_their_own_vms(alice, world, smtp):
    services.do_subscribe(
        alice,
        name="mine",
        kind="email",
        target="alice@example.com",
        events=["job.succeeded", "job.cancelled", "job.downtime_exceeded"],
    )
    mine = finish(
        job_for(world.alice_web, world.d1, options={"max_downtime": 100}), "succeeded", downtime_ms=250
    )
    finish(job_for(world.bob_db, world.d1), "succeeded", downtime_ms=250)
    finish(job_for(world.hidden, world.d1), "cancelled")
    result = dispatch.dispatch()
    assert result["sent"] == 2 and result["failed"] == 0
    subjects = sorted(m["Subject"] for m in smtp.messages)
    assert len(subjects) == 2 and all(mine.vm_name in s for s in subjects)
    assert any("Downtime 250 ms above the requested 100 ms" in s for s in subjects)
    assert {m["To"] for m in smtp.messages} == {"alice@example.com"}
    assert "bob-db" not in str([m.as_string() for m in smtp.messages])
    assert set(Delivery.objects.values_list("last_status_code", flat=True)) == {250}


def test_it_tells_of_approvals_and_hosts(admin, operator, alice, world, webhook, monkeypatch, node_xml):
    sub = services.do_subscribe(
        admin,
        name="all",
        kind="webhook",
        target=webhook.url,
        events=["approval.requested", "approval.decided", "host.unreachable", "host.back"],
        is_global=True,
    )
    webhook.secret = sub.secret
    from migrations_app import preflight
    from migrations_app import services as job_services
    from migrations_app.preflight import Report

    monkeypatch.setattr(preflight, "run_preflight", lambda plan, **kw: Report([], "pass", "", 0, {}))
    job = job_services.do_create_job(world.alice_web, world.d1, "live", {"bandwidth": 50}, actor=alice)
    job_services.do_reject_job(job, operator, "not today")
    from hosts import services as host_services

    gone = Host.objects.create(name="flaky-host", uri="test:///nowhere.xml", status=Host.REACHABLE)
    host_services.do_probe_host(gone)
    Host.objects.filter(pk=gone.pk).update(uri=f"test://{node_xml('back')}")
    gone.refresh_from_db()
    host_services.do_probe_host(gone)
    dispatch.dispatch()
    kinds = [r["event"] for r in webhook.requests]
    assert kinds == ["approval.requested", "approval.decided", "host.unreachable", "host.back"], kinds
    assert webhook.requests[1]["body"]["decision"] == "rejected"
    assert all(r["verified"] for r in webhook.requests)


def test_it_reports_a_broken_audit_chain(admin, world, webhook):
    sub = services.do_subscribe(
        admin, name="chain", kind="webhook", target=webhook.url, events=["audit.chain_broken"], is_global=True
    )
    webhook.secret = sub.secret
    assert dispatch.verify_if_due(every=0) is True
    from django.db import connection

    from kvmweb.audit import guards

    guards.remove(connection)  # what an attacker with database access would do
    try:
        AuditEvent.objects.filter(action="notification.subscribe").update(actor_name="someone else")
    finally:
        guards.install(connection)
    assert dispatch.verify_if_due(every=0) is False
    dispatch.send_due()
    assert [r["event"] for r in webhook.requests] == ["audit.chain_broken"]
    assert webhook.requests[0]["verified"]


def test_it_refuses_webhooks_and_global_subscriptions_to_non_administrators(alice, operator):
    for kwargs in (
        {"kind": "webhook", "target": "http://127.0.0.1:8000/"},
        {"kind": "email", "target": "ops@example.com", "is_global": True},
    ):
        with pytest.raises(services.SubscriptionError):
            services.do_subscribe(operator, name="x", events=["job.failed"], **kwargs)
    assert not Subscription.objects.exists()
    assert AuditEvent.objects.filter(action="notification.subscribe", outcome="denied").count() == 2


def test_it_never_lets_a_failing_receiver_touch_the_job(admin, world, monkeypatch):
    """The sender blows up: the delivery is retried later; the job and its events are as
    the runner left them."""
    services.do_subscribe(
        admin,
        name="boom",
        kind="webhook",
        target="http://127.0.0.1:9/",
        events=["job.failed"],
        is_global=True,
    )

    def explode(sub, delivery):
        raise RuntimeError("receiver bug")

    monkeypatch.setitem(dispatch.SENDERS, "webhook", explode)
    job = finish(job_for(world.alice_web, world.d1), "failed")
    before = MigrationJob.objects.filter(pk=job.pk).values().get()
    assert dispatch.dispatch()["failed"] == 1
    assert MigrationJob.objects.filter(pk=job.pk).values().get() == before
    assert "RuntimeError" in Delivery.objects.get().last_error


def test_it_manages_subscriptions_on_the_page(alice, login, smtp):
    client = login(alice)
    response = client.post(
        "/notifications/",
        {"name": "mine", "kind": "email", "target": "alice@example.com", "events": ["job.failed"]},
    )
    assert response.status_code == 302
    sub = Subscription.objects.get()
    assert sub.owner == alice
    assert client.get(f"/notifications/{sub.pk}/").status_code == 200
    assert client.post(f"/notifications/{sub.pk}/delete/").status_code == 302
    assert not Subscription.objects.exists()
    assert AuditEvent.objects.filter(action="notification.unsubscribe", actor=alice).exists()


def test_it_logs_an_apprise_target_it_cannot_use(admin, world, monkeypatch):
    """apprise is optional: without it (or with a URL it does not know) the delivery log
    says why, and the delivery is retried like any other failure."""
    import builtins

    real_import = builtins.__import__

    def no_apprise(name, *args, **kwargs):
        if name == "apprise":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_apprise)
    services.do_subscribe(
        admin,
        name="chat",
        kind="apprise",
        target="ntfy://example/topic",
        events=["job.failed"],
        is_global=True,
    )
    finish(job_for(world.alice_web, world.d1), "failed")
    dispatch.dispatch()
    delivery = Delivery.objects.get()
    assert delivery.status == "pending" and "apprise is not installed" in delivery.last_error


def test_it_tells_staff_when_a_batch_finishes_and_nobody_else(admin, alice, world, webhook, smtp):
    sub = services.do_subscribe(
        admin, name="ops", kind="webhook", target=webhook.url, events=["batch.finished"], is_global=True
    )
    webhook.secret = sub.secret
    services.do_subscribe(
        alice, name="mine", kind="email", target="alice@example.com", events=["batch.finished"]
    )
    with transaction.atomic():  # what the batch scheduler writes when a batch ends
        record(
            "batch.end",
            target_type="fleet.batch",
            target_id="7",
            target_name="evacuate lab-a",
            details={"status": "succeeded", "counts": {"succeeded": 6}},
        )
    result = dispatch.dispatch()
    assert result["sent"] == 1 and result["failed"] == 0
    assert [r["event"] for r in webhook.requests] == ["batch.finished"] and webhook.requests[0]["verified"]
    assert webhook.requests[0]["body"]["batch"]["status"] == "succeeded"
    assert smtp.messages == []  # self-service users do not hear about batches

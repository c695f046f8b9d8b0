"""The notification dispatcher: audit history -> deliveries -> channels (docs/notifications.md).

Runs on the default django-q2 cluster (``notifications.tasks.dispatch_watch``, scheduled
every minute, each run polling every few seconds), never inside a migration: a job's
transaction commits its audit event, and only a committed event is ever read here, so a
slow or failing receiver cannot delay or fail a migration.

Crash safety: ``collect`` turns the audit events after the cursor into Delivery rows and
advances the cursor in one transaction (both or neither). Audit ids are handed out in
commit order (writers are serialized: IMMEDIATE transactions on SQLite, an advisory lock
on PostgreSQL), so an id cursor never skips an event committed late. A delivery is claimed
with a conditional UPDATE before it is sent, so two dispatchers never send it twice; one
left "sending" by a crashed dispatcher is taken again after CLAIM_TIMEOUT (at least once).
"""

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from notifications.channels import SENDERS
from notifications.events import chain_broken, from_audit
from notifications.models import Cursor, Delivery, Subscription

log = logging.getLogger(__name__)

# Seconds to wait before attempt 2, 3, ...; after the last one the delivery has failed.
BACKOFF = [30, 120, 600, 1800, 3600]
CLAIM_TIMEOUT = timedelta(minutes=5)
BATCH = 500


def _visible(subscription, event):
    """A personal subscription hears only of what its owner may see (the pages' rule)."""
    if subscription.owner_id is None:
        return True
    owner = subscription.owner
    if not owner.is_active:
        return False
    if event.audit_only:
        return owner.has_perm("audit.view_auditevent")
    if event.job is not None:
        from migrations_app.models import MigrationJob

        return MigrationJob.objects.restrict(owner).filter(pk=event.job.pk).exists()
    if event.host is not None:
        from hosts.models import Host

        return Host.objects.restrict(owner).filter(pk=event.host.pk).exists()
    return False


def _deliveries(events, subscriptions, now):
    rows = []
    for event in events:
        for sub in subscriptions:
            if event.kind in (sub.events or []) and _visible(sub, event):
                payload = {"event": event.kind, "id": event.key, "summary": event.summary} | event.payload
                rows.append(
                    Delivery(
                        subscription=sub,
                        event_key=event.key,
                        event=event.kind,
                        payload=payload,
                        next_attempt_at=now,
                    )
                )
    return rows


def _cursor(name):
    """The named cursor, locked for this transaction (created at the newest audit event the
    first time: a new installation is not flooded with its whole history)."""
    from kvmweb.audit.models import AuditEvent

    cursor = Cursor.objects.select_for_update().filter(name=name).first()
    if cursor is None:
        start = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
        cursor = Cursor.objects.create(name=name, position=start if name == "audit" else 0)
    return cursor


def collect(batch=BATCH):
    """Turn new audit events into deliveries. Returns the number of deliveries created."""
    from kvmweb.audit.models import AuditEvent

    now = timezone.now()
    with transaction.atomic():
        cursor = _cursor("audit")
        audits = list(AuditEvent.objects.filter(id__gt=cursor.position).order_by("id")[:batch])
        if not audits:
            return 0
        subscriptions = list(Subscription.objects.filter(enabled=True).select_related("owner"))
        events = [event for audit in audits for event in from_audit(audit)]
        rows = _deliveries(events, subscriptions, now)
        # ignore_conflicts: events collected twice (cannot happen with the cursor lock,
        # but a delivery key is unique anyway) make no second delivery.
        Delivery.objects.bulk_create(rows, ignore_conflicts=True)
        cursor.position = audits[-1].id
        cursor.save(update_fields=["position"])
        reports = [
            a.details["preflight"]
            for a in audits
            if a.action == "migration.request" and isinstance(a.details, dict) and a.details.get("preflight")
        ]
        if reports:
            transaction.on_commit(lambda: _observe(reports))
    return len(rows)


def _observe(reports):
    from api.metrics import observe_preflight

    for report in reports:
        observe_preflight(report, source="job")


def verify_if_due(every=None):
    """Verify the audit chain every NOTIFY_VERIFY_MINUTES; a broken chain is an event for
    global subscriptions and for owners who may read the audit history."""
    from kvmweb.audit.services import verify_chain

    every = every if every is not None else settings.NOTIFY_VERIFY_MINUTES * 60
    now = int(time.time())
    with transaction.atomic():
        cursor = _cursor("verify")
        if now - cursor.position < every:
            return None
        cursor.position = now
        cursor.save(update_fields=["position"])
    checked, bad, reason = verify_chain()
    if bad is None:
        return True
    event = chain_broken(checked, bad, reason)
    subscriptions = list(Subscription.objects.filter(enabled=True).select_related("owner"))
    Delivery.objects.bulk_create(_deliveries([event], subscriptions, timezone.now()), ignore_conflicts=True)
    return False


def _claim(now):
    due = Delivery.objects.filter(
        Q(status=Delivery.PENDING, next_attempt_at__lte=now)
        | Q(status=Delivery.SENDING, claimed_at__lt=now - CLAIM_TIMEOUT)
    ).order_by("next_attempt_at", "id")
    for delivery in due[:BATCH]:
        claimed = Delivery.objects.filter(
            pk=delivery.pk, status=delivery.status, attempts=delivery.attempts
        ).update(status=Delivery.SENDING, claimed_at=now)
        if claimed:
            yield delivery


def send_due():
    """Send every delivery that is due (outside any transaction). Returns (sent, failed)."""
    sent = failed = 0
    for delivery in list(_claim(timezone.now())):
        subscription = Subscription.objects.filter(pk=delivery.subscription_id).first()
        if subscription is None:
            continue
        sender = SENDERS.get(subscription.kind)
        try:
            ok, code, error = sender(subscription, delivery) if sender else (False, None, "unknown channel")
        except Exception as exc:  # noqa: BLE001 - a sender bug must not stop the others
            log.exception("notification delivery %s", delivery.pk)
            ok, code, error = False, None, f"{type(exc).__name__}: {exc}"[:500]
        now = timezone.now()
        attempts = delivery.attempts + 1
        log_line = {"at": now.isoformat(), "status_code": code, "error": error}
        fields = {
            "attempts": attempts,
            "last_status_code": code,
            "last_error": error,
            "attempts_log": (delivery.attempts_log or []) + [log_line],
            "claimed_at": None,
        }
        if ok:
            fields.update(status=Delivery.SENT, sent_at=now)
            sent += 1
        elif attempts > len(BACKOFF):
            fields.update(status=Delivery.FAILED)
            failed += 1
        else:
            fields.update(
                status=Delivery.PENDING, next_attempt_at=now + timedelta(seconds=BACKOFF[attempts - 1])
            )
            failed += 1
        Delivery.objects.filter(pk=delivery.pk, status=Delivery.SENDING).update(**fields)
    return sent, failed


def dispatch():
    """One pass: collect, verify when due, send."""
    created = collect()
    verify_if_due()
    sent, failed = send_due()
    return {"created": created, "sent": sent, "failed": failed}

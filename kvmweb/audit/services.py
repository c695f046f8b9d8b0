"""Writing and verifying the audit chain."""

import hashlib
import hmac
import json

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from kvmweb.audit.models import AuditEvent

GENESIS = "0" * 64
# Arbitrary constant: the PostgreSQL advisory lock that serializes chain writers.
CHAIN_LOCK_ID = 7_284_901


def _canonical(event):
    fields = {
        "at": event.at.isoformat(),
        "actor": event.actor_id,
        "actor_name": event.actor_name,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "target_name": event.target_name,
        "ip": event.ip,
        "outcome": event.outcome,
        "details": event.details,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_hash(prev_hash, event):
    key = settings.AUDIT_HMAC_KEY.encode()
    message = (prev_hash + _canonical(event)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def client_ip(request):
    """The client address. Behind a proxy (KVMWEB_BEHIND_PROXY) trust X-Forwarded-For's
    last hop, which the proxy itself appended; otherwise REMOTE_ADDR."""
    if request is None:
        return None
    if settings.SECURE_PROXY_SSL_HEADER:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded:
            return forwarded.split(",")[-1].strip() or None
    return request.META.get("REMOTE_ADDR") or None


def record(
    action,
    *,
    actor=None,
    request=None,
    target=None,
    target_type="",
    target_id="",
    target_name="",
    outcome=AuditEvent.SUCCESS,
    details=None,
):
    """Append one event to the chain and return it.

    Call it from the service that makes the change, inside the same transaction, so the
    event exists if and only if the change does. ``target`` may be any model instance
    (its type, pk and str() are copied as text). ``actor`` defaults to request.user.

    Chain writers must not interleave: two writers reading the same prev_hash would fork
    the chain. On SQLite every write transaction is IMMEDIATE (one writer at a time); on
    PostgreSQL we take a transaction-scoped advisory lock before reading the last hash.
    """
    if actor is None and request is not None and request.user.is_authenticated:
        actor = request.user
    if target is not None:
        target_type = target_type or target._meta.label_lower
        target_id = target_id or str(target.pk)
        target_name = target_name or str(target)
    # Round-trip through JSON so what we hash is exactly what the JSONField stores.
    details = json.loads(json.dumps(details or {}, cls=DjangoJSONEncoder))
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_ID])
        last = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
        event = AuditEvent(
            at=timezone.now(),
            actor=actor if actor is not None and actor.pk else None,
            actor_name=(actor.get_username() if actor is not None else "")[:150],
            action=action,
            target_type=target_type,
            target_id=str(target_id)[:64],
            target_name=str(target_name)[:255],
            ip=client_ip(request),
            outcome=outcome,
            details=details,
            prev_hash=last or GENESIS,
        )
        event.hash = compute_hash(event.prev_hash, event)
        event.save(force_insert=True)
    return event


def record_refusal(action, *, actor, request, obj, target_type, name, reason):
    """Audit a refused change as a failure, in its own transaction: the refusal is a fact
    even though nothing changed. ``obj`` is the object when it exists (else ``name`` and
    ``target_type`` say what was asked for)."""
    with transaction.atomic():
        return record(
            action,
            actor=actor,
            request=request,
            target=obj,
            target_type=target_type,
            target_name=name if obj is None else "",
            outcome=AuditEvent.FAILURE,
            details={"reason": reason},
        )


def verify_chain(using="default"):
    """Walk the chain in order. Returns (checked_count, first_bad_event_or_None, reason).

    Catches an edited row (its hash no longer matches its fields), a removed or inserted
    row (the next prev_hash no longer matches). Removing rows from the very end leaves a
    shorter valid chain: only an external copy of the last hash (an export) shows that.
    """
    prev = GENESIS
    count = 0
    for event in AuditEvent.objects.using(using).order_by("id").iterator(chunk_size=2000):
        if event.prev_hash != prev:
            return count, event, "prev_hash does not match the previous event (row removed or inserted)"
        if not hmac.compare_digest(event.hash, compute_hash(prev, event)):
            return count, event, "hash does not match the row's contents (row edited)"
        prev = event.hash
        count += 1
    return count, None, ""

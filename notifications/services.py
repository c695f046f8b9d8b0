"""Subscribing and unsubscribing, audited in the same transaction as the change."""

from django.core.exceptions import ValidationError
from django.core.validators import EmailValidator, URLValidator
from django.db import transaction
from django.utils.translation import gettext as _

from kvmweb.accounts.roles import ADMINISTRATOR, has_role
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from notifications.models import EVENT_KINDS, Subscription


class SubscriptionError(Exception):
    """A subscription was refused; the message is meant for people."""


def check_subscription(actor, kind, target, events, is_global):
    """Raise SubscriptionError unless ``actor`` may subscribe like this.

    Webhook and apprise channels make the server send requests to an address of the
    subscriber's choosing (which could be an internal service): administrators only.
    Everyone may have email subscriptions about what they can see; global ones are an
    administrator's."""
    admin = has_role(actor, ADMINISTRATOR)
    if is_global and not admin:
        raise SubscriptionError(_("Only an administrator sets up global notifications."))
    if kind != Subscription.EMAIL and not admin:
        raise SubscriptionError(_("Only an administrator sets up webhook or chat notifications."))
    if kind not in dict(Subscription.KINDS):
        raise SubscriptionError(_("Unknown channel."))
    unknown = [e for e in events if e not in EVENT_KINDS]
    if unknown or not events:
        raise SubscriptionError(_("Choose at least one event."))
    try:
        if kind == Subscription.EMAIL:
            for address in [a.strip() for a in target.split(",") if a.strip()] or [""]:
                EmailValidator()(address)
        elif kind == Subscription.WEBHOOK:
            URLValidator(schemes=["http", "https"])(target)
    except ValidationError:
        raise SubscriptionError(_("Enter a valid address or URL for this channel.")) from None


def do_subscribe(actor, *, name, kind, target, events, is_global=False, request=None):
    """Create a subscription (the actor's own, or global). Refusals are audited."""
    events = list(dict.fromkeys(events))
    try:
        check_subscription(actor, kind, target, events, is_global)
    except SubscriptionError as exc:
        with transaction.atomic():
            record(
                "notification.subscribe",
                actor=actor,
                request=request,
                target_type="notifications.subscription",
                target_name=name,
                outcome=AuditEvent.DENIED,
                details={"kind": kind, "global": is_global, "error": str(exc)},
            )
        raise
    with transaction.atomic():
        sub = Subscription.objects.create(
            name=name[:100],
            owner=None if is_global else actor,
            kind=kind,
            target=target,
            events=events,
            created_by=actor,
        )
        record(
            "notification.subscribe",
            actor=actor,
            request=request,
            target=sub,
            details={"kind": kind, "target": target, "events": events, "global": is_global},
        )
    return sub


def do_unsubscribe(subscription, *, actor, request=None):
    """Delete a subscription and its delivery log."""
    with transaction.atomic():
        record(
            "notification.unsubscribe",
            actor=actor,
            request=request,
            target=subscription,
            details={
                "kind": subscription.kind,
                "target": subscription.target,
                "global": subscription.is_global,
            },
        )
        subscription.delete()


def do_mark_read(user, up_to, request=None):
    """Mark the user's in-app notifications read up to audit event ``up_to`` (never
    backwards: two tabs marking at once keep the higher mark). Audited."""
    from django.db.models.functions import Greatest

    from notifications.models import InboxMark

    up_to = max(0, int(up_to or 0))
    with transaction.atomic():
        mark, _created = InboxMark.objects.get_or_create(user=user)
        InboxMark.objects.filter(pk=mark.pk).update(seen_event_id=Greatest("seen_event_id", up_to))
        record("notifications.read", actor=user, request=request, details={"up_to": up_to})
    mark.refresh_from_db()
    return mark

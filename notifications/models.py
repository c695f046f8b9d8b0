"""Notification subscriptions, their deliveries (the delivery log) and the dispatcher's
cursor over the audit history (docs/notifications.md)."""

import secrets

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from kvmweb.accounts.roles import ADMINISTRATOR, has_role
from kvmweb.accounts.scope import check_action

EVENTS = [
    ("job.succeeded", _("migration succeeded")),
    ("job.failed", _("migration failed")),
    ("job.cancelled", _("migration cancelled")),
    ("job.downtime_exceeded", _("downtime above the requested maximum")),
    ("approval.requested", _("approval requested")),
    ("approval.decided", _("approval decided")),
    ("host.unreachable", _("host unreachable")),
    ("host.back", _("host reachable again")),
    ("audit.chain_broken", _("audit chain verification failed")),
    ("batch.finished", _("batch (evacuation) finished")),
]
EVENT_KINDS = [kind for kind, _label in EVENTS]


def new_secret():
    return secrets.token_urlsafe(32)


class SubscriptionQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule: administrators see every subscription (their own, everyone's and the
        global ones); everyone else only their own."""
        check_action(action)
        if not user.is_authenticated:
            return self.none()
        if has_role(user, ADMINISTRATOR):
            return self
        return self.filter(owner=user)


class Subscription(models.Model):
    """Where to tell whom about which events.

    ``owner`` set: a user's own subscription; it only ever carries events about objects the
    owner may see (the same restrict() rule as the pages, checked at each event). ``owner``
    empty: a global subscription, set by an administrator, for every event of its kinds.
    """

    EMAIL, WEBHOOK, APPRISE = "email", "webhook", "apprise"
    KINDS = [(EMAIL, _("email")), (WEBHOOK, _("webhook")), (APPRISE, _("apprise URL"))]

    name = models.CharField(_("name"), max_length=100)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    kind = models.CharField(_("channel"), max_length=16, choices=KINDS)
    target = models.CharField(_("address or URL"), max_length=1000)
    secret = models.CharField(max_length=100, default=new_secret)  # webhook HMAC key
    events = models.JSONField(default=list)
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = SubscriptionQuerySet.as_manager()

    class Meta:
        ordering = ["name", "id"]

    def __str__(self):
        return f"{self.name} ({self.kind})"

    @property
    def is_global(self):
        return self.owner_id is None


class Delivery(models.Model):
    """One event for one subscription: the delivery log line and its retry state.

    Unique per (subscription, event key): collecting the same audit event twice (a crash
    between collecting and advancing the cursor) never sends twice. ``attempts_log`` keeps
    every attempt's time, HTTP status code (or SMTP answer) and error.
    """

    PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
    STATUSES = [(PENDING, _("pending")), (SENDING, _("sending")), (SENT, _("sent")), (FAILED, _("failed"))]

    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="deliveries")
    event_key = models.CharField(max_length=100)
    event = models.CharField(max_length=40)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=STATUSES, default=PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    attempts_log = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["subscription", "event_key"], name="one_delivery_per_event")
        ]

    def __str__(self):
        return f"{self.event} -> {self.subscription_id} ({self.status})"


class Cursor(models.Model):
    """A named position of the dispatcher: the last audit event id it turned into
    deliveries ("audit"), or the time of the last chain verification ("verify")."""

    name = models.CharField(max_length=32, unique=True)
    position = models.BigIntegerField(default=0)

    def __str__(self):
        return f"{self.name}={self.position}"


class InboxMark(models.Model):
    """How far one user has read their in-app notifications (the header's bell): every
    notification-worthy audit event with a higher id is unread. One row per user, moved
    forward only (notifications.services.do_mark_read)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    seen_event_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"{self.user_id} read up to {self.seen_event_id}"

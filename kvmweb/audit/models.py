"""The audit event: who did what to which object, when, from where, and how it ended."""

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from kvmweb.accounts.roles import sees_everything
from kvmweb.accounts.scope import check_action


class AuditQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule: auditors, operators and administrators read the whole history;
        everyone else sees only events they caused themselves."""
        check_action(action)
        if not user.is_authenticated:
            return self.none()
        if sees_everything(user):
            return self
        return self.filter(actor=user)


class AuditEvent(models.Model):
    """One immutable line of history.

    Names are copied as text (actor_name, target_name) so the history stays readable after
    the user or object is deleted. ``hash`` = HMAC(audit key, prev_hash + canonical fields):
    any edited, inserted or removed row breaks the chain at that point. Database triggers
    refuse UPDATE and DELETE (kvmweb/audit/guards.py); the chain catches what gets past them.
    """

    SUCCESS, FAILURE, DENIED = "success", "failure", "denied"
    OUTCOMES = [(SUCCESS, _("success")), (FAILURE, _("failure")), (DENIED, _("denied"))]

    at = models.DateTimeField(db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_name = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True, db_index=True)
    target_name = models.CharField(max_length=255, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=OUTCOMES, default=SUCCESS)
    details = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_name or '-'} {self.action}"

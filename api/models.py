"""API tokens and the Idempotency-Key memory of the REST API (docs/api.md)."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from kvmweb.accounts.scope import check_action


class ApiTokenQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for API tokens: everyone sees and manages only their own tokens
        (an administrator deactivates an account to stop all of its tokens)."""
        check_action(action)
        if not user.is_authenticated:
            return self.none()
        return self.filter(user=user)


class ApiToken(models.Model):
    """A per-user bearer token for the REST API.

    Only a SHA-256 digest of the token is stored (the token is 256 random bits, so a slow
    hash adds nothing); ``prefix`` (shown in lists and audit events) finds the row. The
    token text itself is shown once, when it is created. A token never authenticates an
    HTML page: only the API's authentication class reads it.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [("view_metrics", "Can read /metrics with an API token")]

    def __str__(self):
        return f"{self.name} ({self.prefix})"

    @property
    def is_expired(self):
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def is_usable(self):
        return self.revoked_at is None and not self.is_expired


class IdempotencyKey(models.Model):
    """The first answer to a POST sent with an ``Idempotency-Key`` header, per user.

    The row is inserted before the request runs (the unique constraint makes a concurrent
    retry with the same key wait for, or see, the first one) and completed with the
    response; a request that failed with a server error forgets its key so it can be
    retried. ``fingerprint`` (method, path, body) refuses a reused key for another request.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=200)
    fingerprint = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)  # None: still running
    body = models.JSONField(null=True, blank=True)
    location = models.CharField(max_length=500, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="one_idempotency_key_per_user")]

    def __str__(self):
        return f"{self.user_id}:{self.key}"

"""API token lifecycle: create, revoke, authenticate. Each writes its audit event in the
same transaction as the change; every refused token is audited too (who tried which
token prefix from where), so a leaked or guessed token shows up in the history."""

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from api.models import ApiToken
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from kvmweb.audit.services import client_ip

TOKEN_PREFIX = "kvmweb"
# last_used_at is written at most this often per token: a busy script must not turn
# every API read into a database write (on SQLite every write takes the one write lock).
LAST_USED_EVERY = timedelta(seconds=60)


class TokenError(Exception):
    """A token request was refused; the message is meant for people."""


class TokenRefused(Exception):
    """A presented token does not authenticate (unknown, wrong, revoked, expired, inactive)."""


class TooManyFailures(TokenRefused):
    """This address presented too many bad tokens lately; it is refused without a look."""


# Bad tokens per address and window before the address is refused outright: guessing is
# pointless (256-bit secrets) but each refusal is an audit event, and a flood of them
# must not flood the audit chain. Reaching the limit is audited once per window.
FAILURE_WINDOW = 300


def _failure_key(ip):
    return f"kvmweb:api-token-failures:{ip or '-'}"


def _note_failure(request):
    """Count one failure for the address; True when this one reaches the limit."""
    from django.core.cache import cache

    key = _failure_key(client_ip(request))
    cache.add(key, 0, FAILURE_WINDOW)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, FAILURE_WINDOW)
        count = 1
    return count == settings.KVMWEB_API_AUTH_FAILURES


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


def do_create_token(user, name, *, expires_days=None, actor=None, request=None):
    """Create a token for ``user``; returns (token row, token text). The text is shown
    once and never stored."""
    name = (name or "").strip()[:100]
    if not name:
        raise TokenError(_("Give the token a name (what or who uses it)."))
    if expires_days is not None and expires_days < 1:
        raise TokenError(_("A token expires after at least one day (or never)."))
    prefix = secrets.token_hex(4)
    text = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user, name=name, prefix=prefix, digest=_digest(text), expires_at=expires_at
        )
        record(
            "api.token.create",
            actor=actor or user,
            request=request,
            target=token,
            details={"user": user.get_username(), "prefix": prefix, "expires_at": expires_at},
        )
    return token, text


def do_revoke_token(token, *, actor, request=None):
    """Revoke a token (idempotent: revoking a revoked token changes nothing and says so)."""
    with transaction.atomic():
        revoked = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        token.refresh_from_db()
        record(
            "api.token.revoke",
            actor=actor,
            request=request,
            target=token,
            outcome=AuditEvent.SUCCESS if revoked else AuditEvent.FAILURE,
            details={"user": token.user.get_username(), "prefix": token.prefix}
            | ({} if revoked else {"error": "already revoked"}),
        )
    return bool(revoked)


def _refuse(request, reason, token=None, prefix=""):
    if _note_failure(request):
        reason += f"; {settings.KVMWEB_API_AUTH_FAILURES} failures from this address: refused for {FAILURE_WINDOW} s"
    with transaction.atomic():
        record(
            "api.token.refused",
            actor=token.user if token is not None else None,
            request=request,
            target=token,
            target_type="api.apitoken",
            outcome=AuditEvent.DENIED,
            details={"reason": reason, "prefix": prefix},
        )
    raise TokenRefused(reason)


def check_token(text, request=None):
    """The (user, token) a presented token authenticates, or TokenRefused (audited).

    ``request`` is the Django request (its address goes into the audit event)."""
    from django.core.cache import cache

    if (cache.get(_failure_key(client_ip(request))) or 0) >= settings.KVMWEB_API_AUTH_FAILURES:
        raise TooManyFailures("too many failures")
    parts = (text or "").strip().split("_", 2)  # the secret itself may contain "_"
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1]:
        _refuse(request, "malformed")
    prefix = parts[1][:16]
    token = ApiToken.objects.select_related("user").filter(prefix=prefix).first()
    if token is None:
        _refuse(request, "unknown", prefix=prefix)
    if not hmac.compare_digest(token.digest, _digest(text.strip())):
        _refuse(request, "wrong secret", token, prefix)
    if token.revoked_at is not None:
        _refuse(request, "revoked", token, prefix)
    if token.is_expired:
        _refuse(request, "expired", token, prefix)
    if not token.user.is_active:
        _refuse(request, "account inactive", token, prefix)
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_EVERY:
        ip = client_ip(request)
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now, last_used_ip=ip)
        token.last_used_at, token.last_used_ip = now, ip
    return token.user, token

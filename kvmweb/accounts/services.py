"""Sign-in and sign-out, audited and rate-limited."""

from datetime import timedelta

from django.conf import settings
from django.contrib import auth
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from kvmweb.audit.services import client_ip


class LoginRefused(Exception):
    """Wrong credentials or too many recent failures; the message is safe to show."""


def check_login_allowed(username, ip):
    """Refuse when this username or this address failed too often in the window.

    Failures are counted from the audit history itself, so the limit holds across every
    web process without a shared cache.
    """
    since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)
    failures = AuditEvent.objects.filter(action="auth.login", outcome=AuditEvent.FAILURE, at__gte=since)
    by_name = failures.filter(target_name=username[:255]).count()
    by_ip = failures.filter(ip=ip).count() if ip else 0
    if max(by_name, by_ip) >= settings.LOGIN_MAX_FAILURES:
        raise LoginRefused(
            _("Too many failed sign-ins. Wait %(minutes)d minutes and try again.")
            % {"minutes": max(1, settings.LOGIN_FAILURE_WINDOW // 60)}
        )


def do_login(request, username, password):
    """Authenticate and start a session; every attempt is audited. Returns the user."""
    ip = client_ip(request)
    try:
        check_login_allowed(username, ip)
    except LoginRefused:
        with transaction.atomic():
            record(
                "auth.login",
                request=request,
                target_type="auth.user",
                target_name=username,
                outcome=AuditEvent.DENIED,
                details={"reason": "rate limited"},
            )
        raise
    user = auth.authenticate(request, username=username, password=password)
    with transaction.atomic():
        if user is None:
            record(
                "auth.login",
                request=request,
                target_type="auth.user",
                target_name=username,
                outcome=AuditEvent.FAILURE,
                details={"reason": "bad credentials or inactive account"},
            )
        else:
            auth.login(request, user)
            record("auth.login", actor=user, request=request, target=user)
    if user is None:
        raise LoginRefused(_("Wrong username or password."))
    return user


def do_logout(request):
    """End the session, audited."""
    user = request.user
    with transaction.atomic():
        if user.is_authenticated:
            record("auth.logout", actor=user, request=request, target=user)
        auth.logout(request)

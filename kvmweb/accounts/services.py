"""Account services: sign-in and sign-out (audited, rate-limited), users, roles and
display preferences. Every change writes its audit event in the same transaction. (VM
ownership and host groups are in hosts/services.py, self-service policies in
migrations_app/services.py.)"""

from datetime import timedelta

from django.conf import settings
from django.contrib import auth
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from kvmweb.accounts.models import UserPreference
from kvmweb.accounts.roles import ADMINISTRATOR, ROLES
from kvmweb.audit import record, record_refusal
from kvmweb.audit.models import AuditEvent
from kvmweb.audit.services import client_ip


class LoginRefused(Exception):
    """Wrong credentials or too many recent failures; the message is safe to show."""


def check_login_allowed(username, ip):
    """Refuse when this user name failed too often from this address in the window.

    The count is per (user name, address) pair: whoever guesses from one address backs
    off that pair only, and cannot lock the user out from anywhere else (nor lock every
    account behind a shared address). Failures before the pair's last successful sign-in
    or before an administrator's unlock of the name (do_unlock_login) do not count.

    Failures are counted from the audit history itself, so the limit holds across every
    web process without a shared cache.
    """
    name = username[:255]
    since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)
    logins = AuditEvent.objects.filter(action="auth.login", target_name=name, ip=ip)
    unlocks = AuditEvent.objects.filter(action="auth.unlock", target_name=name, outcome=AuditEvent.SUCCESS)
    last_reset = max(
        unlocks.order_by("-id").values_list("id", flat=True).first() or 0,
        logins.filter(outcome=AuditEvent.SUCCESS).order_by("-id").values_list("id", flat=True).first() or 0,
    )
    failures = logins.filter(outcome=AuditEvent.FAILURE, at__gte=since, id__gt=last_reset).count()
    if failures >= settings.LOGIN_MAX_FAILURES:
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


def do_unlock_login(user, *, actor, request=None):
    """Let ``user`` sign in again at once from every address: failures recorded before
    this event no longer count (check_login_allowed). Audited; changes nothing else."""
    with transaction.atomic():
        since = timezone.now() - timedelta(seconds=settings.LOGIN_FAILURE_WINDOW)
        pending = AuditEvent.objects.filter(
            action="auth.login",
            outcome=AuditEvent.FAILURE,
            target_name=user.get_username()[:255],
            at__gte=since,
        ).count()
        return record(
            "auth.unlock",
            actor=actor,
            request=request,
            target=user,
            target_name=user.get_username(),
            details={"recent_failures": pending},
        )


def do_logout(request):
    """End the session, audited."""
    user = request.user
    with transaction.atomic():
        if user.is_authenticated:
            record("auth.logout", actor=user, request=request, target=user)
        auth.logout(request)


# --- Roles --------------------------------------------------------------------------


class AccountError(Exception):
    """An administrative change was refused; the message is safe to show."""


def user_roles(user):

    return sorted(set(user.groups.filter(name__in=ROLES).values_list("name", flat=True)))


def do_set_roles(user, roles, *, active=None, actor, request=None):
    """Give ``user`` exactly the role groups ``roles`` (other groups are kept) and, when
    ``active`` is given, enable or disable the account (a disabled account cannot sign
    in, and its open sessions stop working at their next request).

    Refuses (audited as a failure) to remove or disable the last active administrator,
    so nobody can lock everyone out of the administration pages.
    """

    roles = sorted(set(roles))
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise AccountError(_("Unknown role: %(role)s") % {"role": ", ".join(sorted(unknown))})
    active = user.is_active if active is None else bool(active)
    before = user_roles(user)
    loses_admin = ADMINISTRATOR in before and (ADMINISTRATOR not in roles or not active)
    if loses_admin and user.is_active and not user.is_superuser:
        others = (
            get_user_model().objects.filter(is_active=True, groups__name=ADMINISTRATOR).exclude(pk=user.pk)
        )
        if not others.exists():
            # Its own transaction: the refusal is recorded although nothing changes.
            with transaction.atomic():
                record(
                    "user.roles",
                    actor=actor,
                    request=request,
                    target=user,
                    outcome=AuditEvent.FAILURE,
                    details={
                        "before": before,
                        "requested": roles,
                        "active": active,
                        "reason": "last administrator",
                    },
                )
            raise AccountError(_("This is the last administrator; give someone else the role first."))
    with transaction.atomic():
        keep = list(user.groups.exclude(name__in=ROLES))
        user.groups.set(keep + list(Group.objects.filter(name__in=roles)))
        if hasattr(user, "_kvmweb_groups"):
            del user._kvmweb_groups
        details = {"before": before, "after": roles}
        if active != user.is_active:
            details["active"] = [user.is_active, active]
            user.is_active = active
            user.save(update_fields=["is_active"])
        record("user.roles", actor=actor, request=request, target=user, details=details)
    return roles


def do_create_user(username, password, roles, *, actor, request=None):
    """Create a sign-in account with the given roles (audited; the password never is)."""

    User = get_user_model()
    username = (username or "").strip()
    if User.objects.filter(username=username).exists():
        record_refusal(
            "user.create",
            actor=actor,
            request=request,
            obj=None,
            target_type="auth.user",
            name=username,
            reason="name taken",
        )
        raise AccountError(_("A user named %(name)s exists already.") % {"name": username})
    with transaction.atomic():
        user = User.objects.create_user(username=username, password=password)
        record("user.create", actor=actor, request=request, target=user, details={"roles": sorted(roles)})
        if roles:
            do_set_roles(user, roles, actor=actor, request=request)
    return user


THEME_SESSION_KEY = "kvmweb_theme"


def do_set_theme(request, theme):
    """Remember the signed-in user's colour theme (auto, light, dark) on their account and
    in the session. A display preference of one's own: changes nothing anyone else sees,
    so it is not part of the audit history (like the language switch)."""

    if theme not in dict(UserPreference.THEMES):
        raise ValueError(theme)
    UserPreference.objects.update_or_create(user=request.user, defaults={"theme": theme})
    request.session[THEME_SESSION_KEY] = theme
    return theme


def current_theme(request):
    """The user's theme, from the session (read from the account once per session)."""

    theme = request.session.get(THEME_SESSION_KEY)
    if theme is None and request.user.is_authenticated:
        theme = (
            UserPreference.objects.filter(user=request.user).values_list("theme", flat=True).first()
            or UserPreference.AUTO
        )
        request.session[THEME_SESSION_KEY] = theme
    return theme or UserPreference.AUTO

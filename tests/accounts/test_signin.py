"""Sign-in and sign-out: every attempt audited, failures rate-limited per (name, address)
pair, so nobody can lock another user out; an administrator can unlock (audited)."""

from datetime import timedelta
from unittest import mock

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from kvmweb.audit.models import AuditEvent
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def attempt(client, username, password, ip="127.0.0.9"):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)


def signed_in_as(client):
    response = client.get(reverse("dashboard"))
    return response.status_code == 200 and response.wsgi_request.user.get_username()


def test_it_audits_a_successful_sign_in_and_the_sign_out(client, alice):
    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 302 and response.url == reverse("dashboard")
    assert signed_in_as(client) == "alice"
    login = AuditEvent.objects.get(action="auth.login")
    assert login.outcome == AuditEvent.SUCCESS and login.actor == alice and login.ip == "127.0.0.9"
    client.post(reverse("logout"), REMOTE_ADDR="127.0.0.9")
    logout = AuditEvent.objects.get(action="auth.logout")
    assert logout.actor == alice and logout.outcome == AuditEvent.SUCCESS
    assert client.get(reverse("dashboard")).status_code == 302


def test_it_audits_a_failed_sign_in_as_a_failure_without_the_password(client, alice):
    response = attempt(client, "alice", "wrong password")
    assert response.status_code == 200 and "Wrong username or password." in response.content.decode()
    event = AuditEvent.objects.get(action="auth.login")
    assert event.outcome == AuditEvent.FAILURE and event.actor is None
    assert event.target_name == "alice" and event.ip == "127.0.0.9"
    assert "wrong password" not in str(event.details)
    assert not AuditEvent.objects.filter(outcome=AuditEvent.SUCCESS).exists()


def test_it_refuses_after_five_failures_even_with_the_right_password(client, alice):
    assert settings.LOGIN_MAX_FAILURES == 5
    for _ in range(5):
        assert attempt(client, "alice", "nope").status_code == 200
    response = attempt(client, "alice", PASSWORD)
    assert "Too many failed sign-ins" in response.content.decode()
    assert signed_in_as(client) is False
    outcomes = list(
        AuditEvent.objects.filter(action="auth.login").order_by("id").values_list("outcome", flat=True)
    )
    assert outcomes == [AuditEvent.FAILURE] * 5 + [AuditEvent.DENIED]


def test_it_does_not_lock_other_accounts_behind_a_guessing_address(client, alice, bob):
    for name in ("x1", "x2", "x3", "x4", "x5", "x6"):
        attempt(client, name, "nope", ip="127.0.0.66")
    # Users behind the same address (a NAT, a proxy) are not locked out by the guesser.
    assert attempt(client, "bob", PASSWORD, ip="127.0.0.66").status_code == 302


def test_it_does_not_let_a_stranger_lock_a_user_out_from_elsewhere(client, admin):
    """Twenty wrong passwords for `admin` from one address: that pair waits, while admin
    signs in from their own address."""
    for _ in range(20):
        attempt(client, "admin", "nope", ip="198.51.100.7")
    assert (
        "Too many failed sign-ins" in attempt(client, "admin", PASSWORD, ip="198.51.100.7").content.decode()
    )
    response = attempt(client, "admin", PASSWORD, ip="127.0.0.10")
    assert response.status_code == 302 and signed_in_as(client) == "admin"
    denied = AuditEvent.objects.filter(action="auth.login", outcome=AuditEvent.DENIED)
    assert denied.count() == 15 + 1 and set(denied.values_list("ip", flat=True)) == {"198.51.100.7"}


def test_it_forgets_earlier_failures_of_the_pair_after_a_success(client, alice):
    for _ in range(4):
        attempt(client, "alice", "nope")
    assert attempt(client, "alice", PASSWORD).status_code == 302
    client.post(reverse("logout"))
    for _ in range(4):
        attempt(client, "alice", "nope")
    assert attempt(client, "alice", PASSWORD).status_code == 302


def test_it_lets_an_administrator_unlock_a_user_audited(client, login, admin, alice):
    from django.test import Client

    for _ in range(5):
        attempt(client, "alice", "nope", ip="127.0.0.9")
    assert "Too many failed sign-ins" in attempt(client, "alice", PASSWORD).content.decode()
    response = login(admin).post(reverse("accounts:user_unlock", args=[alice.pk]))
    assert response.status_code == 302
    unlock = AuditEvent.objects.get(action="auth.unlock")
    assert unlock.actor == admin and unlock.target_name == "alice" and unlock.outcome == AuditEvent.SUCCESS
    assert unlock.details == {"recent_failures": 5}
    fresh = Client()
    assert attempt(fresh, "alice", PASSWORD).status_code == 302 and signed_in_as(fresh) == "alice"


def test_it_lets_the_user_in_again_after_the_window(client, alice):
    for _ in range(5):
        attempt(client, "alice", "nope")
    later = timezone.now() + timedelta(seconds=settings.LOGIN_FAILURE_WINDOW + 1)
    with mock.patch("django.utils.timezone.now", return_value=later):
        response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 302 and signed_in_as(client) == "alice"
    last = AuditEvent.objects.filter(action="auth.login").order_by("-id").first()
    assert last.outcome == AuditEvent.SUCCESS and last.actor == alice

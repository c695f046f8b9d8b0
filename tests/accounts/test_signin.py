"""Sign-in and sign-out: every attempt audited, failures rate-limited per name and address."""

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


def test_it_counts_failures_per_address_across_user_names(client, alice, bob):
    for name in ("x1", "x2", "x3", "x4", "x5"):
        attempt(client, name, "nope", ip="127.0.0.66")
    assert "Too many failed sign-ins" in attempt(client, "bob", PASSWORD, ip="127.0.0.66").content.decode()
    # Another address is not affected by that address's failures.
    assert attempt(client, "bob", PASSWORD, ip="127.0.0.67").status_code == 302


def test_it_lets_the_user_in_again_after_the_window(client, alice):
    for _ in range(5):
        attempt(client, "alice", "nope")
    later = timezone.now() + timedelta(seconds=settings.LOGIN_FAILURE_WINDOW + 1)
    with mock.patch("django.utils.timezone.now", return_value=later):
        response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 302 and signed_in_as(client) == "alice"
    last = AuditEvent.objects.filter(action="auth.login").order_by("-id").first()
    assert last.outcome == AuditEvent.SUCCESS and last.actor == alice

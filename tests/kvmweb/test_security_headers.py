"""Site-wide hardening: Content-Security-Policy without inline script, password rules,
one-line logging of refused requests, no Django admin."""

import logging
import re
from pathlib import Path

import pytest
from django.urls import reverse

from kvmweb.security import CONTENT_SECURITY_POLICY

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def directives(header):
    return {part.split()[0]: part.split()[1:] for part in header.split("; ") if part}


@pytest.mark.django_db
def test_it_sends_a_policy_that_allows_only_own_scripts(client, admin):
    client.force_login(admin)
    for url in (reverse("login"), reverse("dashboard"), reverse("migrations:list"), "/no/such/page/"):
        header = client.get(url)["Content-Security-Policy"]
        assert header == CONTENT_SECURITY_POLICY
    policy = directives(CONTENT_SECURITY_POLICY)
    assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]


def test_it_has_no_inline_script_in_any_template():
    """An inline <script> or on*= handler would be blocked by the policy (and break the
    page): every template keeps script in static/js/. JSON data blocks are not script."""
    offenders = []
    for path in TEMPLATES.rglob("*.html"):
        text = path.read_text()
        for tag in re.findall(r"<script\b[^>]*>", text):
            if "src=" not in tag and 'type="application/json"' not in tag:
                offenders.append(f"{path.name}: {tag}")
        for handler in re.findall(r"\son[a-z]+\s*=", text):
            offenders.append(f"{path.name}: {handler.strip()}")
        if "javascript:" in text.lower():
            offenders.append(f"{path.name}: javascript: URL")
    assert not offenders, offenders


@pytest.mark.django_db
def test_it_refuses_a_password_like_the_user_name_or_shorter_than_12(login, admin):
    from django.contrib.auth.models import User

    client = login(admin)
    for username, password in (
        ("gwendolyn-carter", "gwendolyn-carter"),  # the name itself (long enough, not common)
        ("gwendolyn-carter", "Gwendolyn-Carter1"),  # too similar to the name
        ("frank", "xq7#Lm2!pW"),  # 10 characters
    ):
        response = client.post(reverse("accounts:user_add"), {"username": username, "password": password})
        assert response.status_code == 200, (username, password)
        assert not User.objects.filter(username=username).exists()
    body = response.content.decode()
    assert "at least 12 characters" in body
    response = client.post(
        reverse("accounts:user_add"), {"username": "frank", "password": "xq7#Lm2!pW-river"}
    )
    assert response.status_code == 302 and User.objects.filter(username="frank").exists()


@pytest.mark.django_db
def test_it_logs_a_refused_request_on_one_line(login, mallory, caplog):
    from kvmweb.security import OneLineForbidden

    client = login(mallory)
    with caplog.at_level(logging.WARNING, logger="django.request"):
        assert client.get(reverse("accounts:users")).status_code == 403
    records = [r for r in caplog.records if r.name == "django.request"]
    assert len(records) == 1 and records[0].status_code == 403
    assert records[0].exc_info is None
    formatted = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(records[0])
    assert "\n" not in formatted and "Traceback" not in formatted
    assert formatted == "WARNING django.request: Forbidden (Permission denied): /accounts/users/"
    # The filter is what the project's logging configuration installs on django.request.
    assert any(isinstance(f, OneLineForbidden) for f in logging.getLogger("django.request").filters)


@pytest.mark.django_db
def test_it_disables_accounts_and_never_deletes_them(alice):
    from django.contrib.auth.models import User
    from django.db import transaction

    from kvmweb.accounts.apps import UserDeletionRefused
    from kvmweb.audit import record

    record("test.by_alice", actor=alice)
    with pytest.raises(UserDeletionRefused, match="disable the account instead"), transaction.atomic():
        alice.delete()
    assert User.objects.filter(pk=alice.pk).exists()

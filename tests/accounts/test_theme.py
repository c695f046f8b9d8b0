"""Dark mode: the page follows the system unless the user chose light or dark; the
choice is kept on the account (every browser) and cached in the session."""

import pytest
from django.test import Client
from django.urls import reverse

from kvmweb.accounts.models import UserPreference

pytestmark = pytest.mark.django_db


def theme_of(client):
    body = client.get(reverse("dashboard")).content.decode()
    return body.split('data-theme="')[1].split('"')[0]


def test_it_follows_the_system_until_the_user_chooses(login, operator):
    client = login(operator)
    assert theme_of(client) == "auto"
    response = client.post(reverse("accounts:theme"), {"theme": "dark", "next": "/vms/"})
    assert response.status_code == 302 and response.url == "/vms/"
    assert UserPreference.objects.get(user=operator).theme == "dark"
    assert theme_of(client) == "dark"
    # Another browser: a new session reads the choice from the account.
    other = Client()
    other.force_login(operator)
    assert theme_of(other) == "dark"


def test_it_refuses_unknown_themes_and_foreign_next_urls(login, alice):
    client = login(alice)
    response = client.post(reverse("accounts:theme"), {"theme": "neon", "next": "https://evil.example/"})
    assert response.status_code == 302 and response.url == reverse("dashboard")
    assert not UserPreference.objects.exists()
    assert client.get(reverse("accounts:theme")).status_code == 405


def test_it_keeps_one_users_choice_from_anothers(login, alice, bob):
    login(alice).post(reverse("accounts:theme"), {"theme": "light"})
    bob_client = Client()
    bob_client.force_login(bob)
    assert theme_of(bob_client) == "auto"
    assert list(UserPreference.objects.values_list("user__username", "theme")) == [("alice", "light")]


def test_it_needs_a_signed_in_user(client):
    response = client.post(reverse("accounts:theme"), {"theme": "dark"})
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    assert not UserPreference.objects.exists()


def test_it_serves_a_favicon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response.url.endswith("favicon.svg")
    assert b'<link rel="icon"' in client.get(reverse("login")).content

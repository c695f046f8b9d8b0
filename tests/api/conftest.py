import pytest
from django.test import Client

from tests.receivers import webhook  # noqa: F401 - shared fixture


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Rate-limit and failure counters live in the cache: each test starts with none."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def token_for(db):
    """token_for(user) -> the text of a fresh API token of that user."""
    from api import services

    def make(user, **kwargs):
        return services.do_create_token(user, "test", actor=user, **kwargs)[1]

    return make


@pytest.fixture
def api(token_for):
    """api(user) -> a client that sends that user's fresh token as a Bearer header."""

    def make(user):
        return Client(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")

    return make


@pytest.fixture
def clean_preflight(monkeypatch):
    """The checklist with nothing blocking (these tests exercise the API, not the checks)."""
    from migrations_app import preflight
    from migrations_app.preflight import Report

    monkeypatch.setattr(
        preflight,
        "run_preflight",
        lambda plan, **kw: Report(results=[], verdict="pass", started_at="", duration_ms=0, plan={}),
    )

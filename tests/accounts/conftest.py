import pytest


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Personas are created per test; PBKDF2 at full strength costs ~0.3 s per user."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

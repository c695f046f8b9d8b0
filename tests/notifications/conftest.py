import pytest

from tests.receivers import smtp, webhook  # noqa: F401 - shared fixtures


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

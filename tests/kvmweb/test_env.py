"""Settings helpers fail loudly on bad values and read secrets from *_FILE."""

import pytest

from kvmweb.env import ConfigError, database_from_url, env_bool, env_int, env_list, env_secret


def test_it_parses_booleans_and_refuses_nonsense(monkeypatch):
    monkeypatch.setenv("X_FLAG", "yes")
    assert env_bool("X_FLAG") is True
    monkeypatch.setenv("X_FLAG", "perhaps")
    with pytest.raises(ConfigError, match="X_FLAG='perhaps' is not a boolean"):
        env_bool("X_FLAG")


def test_it_checks_numbers_and_minimums(monkeypatch):
    monkeypatch.setenv("X_N", "abc")
    with pytest.raises(ConfigError, match="not a whole number"):
        env_int("X_N", 1)
    monkeypatch.setenv("X_N", "0")
    with pytest.raises(ConfigError, match="at least 1"):
        env_int("X_N", 1, minimum=1)
    monkeypatch.setenv("X_N", "7")
    assert env_int("X_N", 1, minimum=1) == 7


def test_it_splits_lists(monkeypatch):
    monkeypatch.setenv("X_L", " a, b ,,c ")
    assert env_list("X_L") == ["a", "b", "c"]


def test_it_reads_secrets_from_files_and_refuses_both(monkeypatch, tmp_path):
    secret = tmp_path / "s"
    secret.write_text("from-file\n")
    monkeypatch.setenv("X_SECRET_FILE", str(secret))
    assert env_secret("X_SECRET") == "from-file"
    monkeypatch.setenv("X_SECRET", "direct")
    with pytest.raises(ConfigError, match="not both"):
        env_secret("X_SECRET")
    monkeypatch.delenv("X_SECRET")
    monkeypatch.setenv("X_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read"):
        env_secret("X_SECRET")


def test_it_generates_a_fallback_secret_once_with_private_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("X_SECRET", raising=False)
    monkeypatch.delenv("X_SECRET_FILE", raising=False)
    path = tmp_path / "sub" / "key"
    first = env_secret("X_SECRET", fallback_file=path)
    assert len(first) > 40 and env_secret("X_SECRET", fallback_file=path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="must be set"):
        env_secret("X_SECRET")


def test_it_parses_database_urls():
    db = database_from_url("postgres://kv%40web:p%2Fss@db.example:5433/kvmweb")
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "kv@web",
        "p/ss",
        "db.example",
        "5433",
        "kvmweb",
    )
    with pytest.raises(ConfigError, match="not supported"):
        database_from_url("mysql://x/y")
    with pytest.raises(ConfigError, match="no database name"):
        database_from_url("postgres://x/")

"""Environment helpers for settings: every value is read here and fails loudly when bad.

A secret can come from ``NAME`` or from a file named by ``NAME_FILE`` (Docker/systemd
credentials style). Both set is an error, so nobody wonders which one won.
"""

import os
import secrets
from pathlib import Path


class ConfigError(RuntimeError):
    """A configuration value in the environment is missing or malformed."""


def env_str(name, default=None):
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_bool(name, default=False):
    value = env_str(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name, default, minimum=None):
    value = env_str(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} must be at least {minimum}")
    return number


def env_float(name, default, minimum=None):
    value = env_str(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} must be at least {minimum}")
    return number


def env_list(name, default=()):
    value = env_str(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_secret(name, fallback_file=None):
    """Read a secret from NAME or NAME_FILE; else from (or into) ``fallback_file``.

    The fallback keeps `make run` zero-configuration: a random secret is generated once,
    stored with mode 0600 and reused, so sessions and the audit chain survive restarts.
    """
    direct, path = env_str(name), env_str(f"{name}_FILE")
    if direct and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path}: cannot read ({exc.strerror})") from None
        if not value:
            raise ConfigError(f"{name}_FILE={path} is empty")
        return value
    if direct:
        return direct
    if fallback_file is None:
        raise ConfigError(f"{name} (or {name}_FILE) must be set")
    fallback_file = Path(fallback_file)
    if not fallback_file.exists():
        fallback_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(fallback_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return fallback_file.read_text().strip()


def database_from_url(url):
    """Turn DATABASE_URL (postgres://user:pass@host:port/name) into a DATABASES entry."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql", "pgsql"):
        raise ConfigError(f"DATABASE_URL scheme {parsed.scheme!r} is not supported: use postgres://")
    name = parsed.path.lstrip("/")
    if not name:
        raise ConfigError("DATABASE_URL has no database name (postgres://user@host/NAME)")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(name),
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": 0,  # ASGI runs each request in its own thread: persistent ones leak
        "CONN_HEALTH_CHECKS": True,
    }


def secure_data_dir(path, extra_files=(), public=()):
    """Keep kvmweb's data private to the account that runs it.

    Sets the process umask to 077, so every file kvmweb creates from here on (the SQLite
    database and its -wal/-shm, generated keys, collected static files) is 0600 and
    every directory 0700. Then creates ``path`` (0700) and checks what is already there,
    recursively, plus ``extra_files`` (a database kept elsewhere): anything readable or
    writable by group or others is narrowed to 0600 / 0700 with a message on stderr,
    because a readable database or key hands out sessions, password hashes and the
    audit key to every local user. A mode kvmweb cannot change (a file owned by someone
    else) is a ConfigError: kvmweb refuses to start rather than run exposed. Directories
    in ``public`` (collected static files) are left as they are.
    """
    import stat
    import sys

    os.umask(0o077)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    def narrow(p, wanted):
        try:
            mode = stat.S_IMODE(os.lstat(p).st_mode)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(os.lstat(p).st_mode) or not mode & 0o077:
            return
        try:
            os.chmod(p, mode & wanted)
        except OSError as exc:
            raise ConfigError(
                f"{p} is accessible to other users (mode {mode:04o}) and kvmweb cannot narrow it "
                f"({exc.strerror}); run: chmod go-rwx {p}"
            ) from None
        sys.stderr.write(
            f"kvmweb: {p} was accessible to other users (mode {mode:04o}); now {mode & wanted:04o}\n"
        )

    narrow(path, 0o700)
    skip = {os.path.realpath(p) for p in public}
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in skip]
        for name in dirs:
            narrow(os.path.join(root, name), 0o700)
        for name in files:
            narrow(os.path.join(root, name), 0o600)
    for extra in extra_files:
        for suffix in ("", "-wal", "-shm", "-journal"):
            narrow(f"{extra}{suffix}", 0o600)

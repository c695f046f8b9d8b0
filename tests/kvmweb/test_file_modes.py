"""kvmweb's data stays private: after the setup steps of `make run` (scripts/setup.sh),
run as real processes under a usual umask of 022, the data directory is 0700 and every
file in it, the live SQLite -wal/-shm included, is 0600; wider modes found at start are
narrowed with a message."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kvmweb.env import ConfigError, secure_data_dir

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "KVMWEB_SQLITE_PATH",
    "KVMWEB_STATIC_ROOT",
    "KVMWEB_SECRET_KEY",
    "KVMWEB_SECRET_KEY_FILE",
    "KVMWEB_AUDIT_KEY",
    "KVMWEB_AUDIT_KEY_FILE",
    "KVMWEB_ADMIN_PASSWORD",
)
# Lists every path under the data dir with its mode while a connection holds the
# database open in WAL mode (so -wal and -shm exist).
LIST_MODES = """
import json, os, stat
from django.conf import settings
from django.db import connection
from hosts.models import HostGroup
HostGroup.objects.create(name="modes-probe")
modes = {}
for root, dirs, files in os.walk(settings.DATA_DIR):
    for name in dirs + files:
        path = os.path.join(root, name)
        modes[os.path.relpath(path, settings.DATA_DIR)] = stat.S_IMODE(os.lstat(path).st_mode)
modes["."] = stat.S_IMODE(os.stat(settings.DATA_DIR).st_mode)
print(json.dumps(modes))
"""


def manage(data_dir, *args):
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV and k != "DJANGO_SETTINGS_MODULE"}
    env["KVMWEB_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o022),  # a usual login shell's umask
        check=True,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data directory after the steps `make run` runs before starting the site
    (scripts/setup.sh run)."""
    data = tmp_path_factory.mktemp("modes") / "data"
    manage(data, "migrate", "--noinput", "-v", "0")
    manage(data, "ensure_admin")
    manage(data, "ensure_schedules", "-v", "0")
    return data


def test_it_keeps_the_data_directory_private_after_setup(data):
    modes = json.loads(manage(data, "shell", "-c", LIST_MODES).stdout.strip().splitlines()[-1])
    for name in ("kvmweb.sqlite3", "kvmweb.sqlite3-wal", "kvmweb.sqlite3-shm", "secret_key", "audit_key"):
        assert name in modes, sorted(modes)
    assert modes.pop(".") == 0o700
    modes.pop("staticfiles")  # public (collected CSS/JS), left as it is
    wide = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert not wide, wide


def test_it_narrows_wider_modes_at_start_with_a_message(data):
    os.chmod(data, 0o755)
    os.chmod(data / "kvmweb.sqlite3", 0o644)
    os.chmod(data / "secret_key", 0o640)
    result = manage(data, "check")
    assert f"kvmweb: {data} was accessible to other users (mode 0755); now 0700" in result.stderr
    assert (
        f"kvmweb: {data / 'kvmweb.sqlite3'} was accessible to other users (mode 0644); now 0600"
        in result.stderr
    )
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data / "kvmweb.sqlite3").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data / "secret_key").st_mode) == 0o600
    assert "accessible" not in manage(data, "check").stderr  # nothing left to narrow


def test_it_refuses_to_start_when_it_cannot_narrow_a_mode(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "kvmweb.sqlite3").write_text("")
    os.chmod(data / "kvmweb.sqlite3", 0o644)
    umask = os.umask(0o022)
    os.umask(umask)

    def chmod(path, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", chmod)
    try:
        with pytest.raises(ConfigError, match=r"accessible to other users \(mode 0644\).*chmod go-rwx"):
            secure_data_dir(data)
    finally:
        os.umask(umask)

"""`manage.py cli_server`: migrate_vm and preflight run in a process forked from a server
that has Django loaded, with the caller's streams, environment and exit status; callers
with other settings (or with KVMWEB_CLI_SERVER=0) run the command themselves."""

import os
import socket
import stat
import subprocess
import time

import pytest

from migrations_app import cliclient, cliserver
from tests.sites import PY, ROOT, migrated_template, site_env


def test_it_refuses_other_settings_and_other_commands_but_not_per_run_values():
    ours = {"KVMWEB_DATA_DIR": "/d", "DJANGO_SETTINGS_MODULE": "kvmweb.settings", "HOME": "/root"}
    same = dict(ours, HOME="/home/x", KVMWEB_CLI_TIMING="1", KVMWEB_ADMIN_USER="bob")
    assert cliserver.refusal({"argv": ["migrate_vm", "vm"], "env": same}, ours) == ""
    other_db = dict(ours, DATABASE_URL="postgres://elsewhere/kvmweb")
    assert "DATABASE_URL" in cliserver.refusal({"argv": ["migrate_vm"], "env": other_db}, ours)
    assert "KVMWEB_DATA_DIR" in cliserver.refusal(
        {"argv": ["preflight"], "env": {**ours, "KVMWEB_DATA_DIR": "/e"}}, ours
    )
    assert cliserver.refusal({"argv": ["shell"], "env": ours}, ours) == "not a served command"
    # Other settings on the command line (applied before Django's set-up, which a served
    # command has behind it): run by manage.py itself, not against the server's database.
    for flag in (["--settings=kvmweb.other"], ["--settings", "kvmweb.other"], ["--pythonpath=/x"]):
        assert "--settings/--pythonpath" in cliserver.refusal(
            {"argv": ["migrate_vm", "vm", *flag], "env": same}, ours
        )


def test_it_writes_the_request_as_json_the_server_reads_back_unchanged():
    # The client writes its JSON by hand (no json import before the command runs): every
    # value an environment or command line can hold must come back as it was sent.
    import json

    tricky = [
        "plain",
        'q"uote\\back',
        "tab\tnew\nline",
        "\x7f\x00",
        "ünï €",
        "\U0001f600",
        "\udcff",
        "\u2028",
    ]
    request = {
        "argv": tricky,
        "env": {f"K{i}": v for i, v in enumerate(tricky)},
        "cwd": "/",
        "files": {"X": None},
    }
    text = cliclient._json(request)
    assert text.isascii() and json.loads(text) == request


def test_it_matches_secret_files_by_content_not_path(tmp_path):
    # Under systemd the server reads its secrets from its credentials directory
    # (docs/deploy/kvmweb-cli.service); an operator's shell names the same files in
    # /etc/kvmweb/secrets/. Same content: served; other content or unreadable: refused.
    (tmp_path / "ours").write_text("k1")
    (tmp_path / "same").write_text("k1")
    (tmp_path / "other").write_text("k2")
    base = {"KVMWEB_DATA_DIR": "/d"}
    ours = dict(base, KVMWEB_SECRET_KEY_FILE=str(tmp_path / "ours"))
    server_files = cliclient.file_digests(ours)

    def why(**env):
        env = dict(base, **env)
        request = {
            "argv": ["migrate_vm"],
            "env": env,
            "files": cliclient.file_digests(env),
            "cwd": str(tmp_path),
        }
        return cliserver.refusal(request, ours, server_files)

    assert why(KVMWEB_SECRET_KEY_FILE=str(tmp_path / "same")) == ""
    assert why(KVMWEB_SECRET_KEY_FILE=str(tmp_path / "ours")) == ""
    for path in ("other", "missing"):
        assert why(KVMWEB_SECRET_KEY_FILE=str(tmp_path / path)) == "other settings: KVMWEB_SECRET_KEY_FILE"
    assert why() == "other settings: KVMWEB_SECRET_KEY_FILE"  # the caller names no key file
    assert why(KVMWEB_SECRET_KEY_FILE=str(tmp_path / "same"), PGPASSFILE=str(tmp_path / "same")) == (
        "other settings: PGPASSFILE"
    )
    # A working directory the server cannot see (its private /tmp under systemd).
    request = {"argv": ["preflight"], "env": ours, "files": server_files, "cwd": str(tmp_path / "gone")}
    assert cliserver.refusal(request, ours, server_files) == "working directory not visible to the server"
    # One it sees, but another directory than the caller's at that path (PrivateTmp's
    # own /tmp/x, another mount namespace): refused too. The caller's own: served.
    here = tmp_path.stat()
    request.update(cwd=str(tmp_path), cwd_id=f"{here.st_dev}:{here.st_ino}")
    assert cliserver.refusal(request, ours, server_files) == ""
    elsewhere = (tmp_path / "other").stat()
    request.update(cwd_id=f"{elsewhere.st_dev}:{elsewhere.st_ino}")
    assert cliserver.refusal(request, ours, server_files) == (
        "working directory not the caller's (the server sees another one at that path)"
    )


@pytest.fixture
def served(tmp_path):
    """A data dir with a migrated DB and a running cli_server (stopped by its PID)."""
    for name in ("kvmweb.sqlite3", "secret_key", "audit_key"):
        (tmp_path / name).write_bytes((migrated_template() / name).read_bytes())
    env = site_env(tmp_path)
    env.pop("KVMWEB_CLI_SERVER", None)
    log = open(tmp_path / "cli_server.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [PY, "manage.py", "cli_server"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    path = cliclient.socket_path(env)
    deadline = time.monotonic() + 120  # a loaded machine: Django start-up can take seconds
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "cli_server.log"
            ).read_text()
            time.sleep(0.05)
    yield env, path, tmp_path / "cli_server.log"
    proc.terminate()
    proc.wait(30)
    log.close()


def _manage(env, *args):
    return subprocess.run(
        [PY, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_it_runs_migrate_vm_in_a_served_process_with_the_callers_streams_and_status(served):
    env, path, log = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    r = _manage(env, "migrate_vm", "web1", "hb", "--mode", "live", "--user", "nobody-here")
    assert r.returncode == 2 and "no kvmweb user 'nobody-here'" in r.stderr, r
    assert "migrate_vm in process" in log.read_text()
    helped = _manage(env, "migrate_vm", "--help")
    assert helped.returncode == 0 and "usage: manage.py migrate_vm" in helped.stdout
    assert log.read_text().count("migrate_vm in process") == 2


def test_it_runs_the_command_itself_when_the_server_has_other_settings_or_is_switched_off(served):
    env, _path, log = served
    other = _manage(
        dict(env, KVMWEB_LIBVIRT_CALL_TIMEOUT="7"), "migrate_vm", "w", "h", "--mode", "live", "--user", "x"
    )
    assert other.returncode == 2 and "no kvmweb user 'x'" in other.stderr
    assert "refused ['migrate_vm']: other settings: KVMWEB_LIBVIRT_CALL_TIMEOUT" in log.read_text()
    off = _manage(dict(env, KVMWEB_CLI_SERVER="0"), "migrate_vm", "w", "h", "--mode", "live", "--user", "x")
    assert off.returncode == 2 and "no kvmweb user 'x'" in off.stderr
    assert "in process" not in log.read_text()


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("message", [b"x", b"\x00\x00\x00\x09{not json", b"\x00\x00\x00\x40{}"])
def test_it_closes_the_streams_of_a_bad_request(message):
    """A short, unreadable or truncated request: the descriptors that came with it are
    closed, not kept open in the long-lived server (one leak per bad request)."""
    ours, server_side = socket.socketpair()
    r, w = os.pipe()
    try:
        server_side.settimeout(5)
        before = _open_fds()
        socket.send_fds(ours, [message], [r, w, r])
        ours.shutdown(socket.SHUT_WR)  # the truncated one ends here
        with pytest.raises(ValueError):
            cliserver._recv_request(server_side)
        assert _open_fds() == before
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        server_side.close()

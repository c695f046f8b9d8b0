"""The systemd units of docs/deploy/: the command server's unit (kvmweb-cli.service) runs
`manage.py cli_server` as the workers run, so manage.py finds its socket in the same data
directory, and the target starts it with the rest."""

from pathlib import Path

from migrations_app import cliclient

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
SAME_AS_WORKERS = (
    "User",
    "Group",
    "WorkingDirectory",
    "EnvironmentFile",
    "LoadCredential",
    "NoNewPrivileges",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectSystem",
    "ProtectHome",
    "ReadWritePaths",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RestrictAddressFamilies",
    "LockPersonality",
)


def unit(name):
    """{key: [values]} of a unit file (all sections; keys may repeat)."""
    values = {}
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def env_file():
    return dict(
        line.split("=", 1)
        for line in (DEPLOY / "kvmweb.env").read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_it_runs_the_cli_server_like_the_workers_and_where_manage_py_looks():
    cli, workers = unit("kvmweb-cli.service"), unit("kvmweb-qcluster@.service")
    for key in SAME_AS_WORKERS:
        assert cli.get(key) == workers.get(key), key
    assert cli["ExecStart"] == ["/opt/kvmweb/.venv/bin/python manage.py cli_server"]
    # Its secrets under the same variables as the workers' (credentials directory).
    for var in ("KVMWEB_SECRET_KEY_FILE", "KVMWEB_AUDIT_KEY_FILE", "PGPASSFILE"):
        assert any(e.startswith(f"{var}=%d/") for e in cli["Environment"]), var
    # The socket manage.py connects to, computed from the environment file both read,
    # is in the one directory the service may write.
    sock = cliclient.socket_path(env_file())
    assert sock.parent == Path(cli["ReadWritePaths"][0])
    assert cli["EnvironmentFile"] == ["/etc/kvmweb/kvmweb.env"]
    # A restart stops the server, not the commands it forked (they may be migrating).
    assert cli["KillMode"] == ["process"]
    assert cli["PartOf"] == ["kvmweb.target"] and cli["WantedBy"] == ["kvmweb.target"]
    wanted = " ".join(unit("kvmweb.target")["Wants"]).split()
    assert "kvmweb-cli.service" in wanted


def test_it_documents_installing_every_unit():
    guide = (DEPLOY.parent / "deploy.md").read_text()
    for path in DEPLOY.glob("*.service"):
        assert f"docs/deploy/{path.name}" in guide, path.name

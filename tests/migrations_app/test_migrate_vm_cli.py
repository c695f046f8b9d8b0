"""`manage.py migrate_vm` start-up costs: no system checks, and --quick skips the 1 s
dirty-rate measurement of the checklist (the default still measures)."""

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import BaseCommand

from hosts.models import VM, Host
from migrations_app import preflight
from migrations_app.management.commands import preflight as preflight_command  # noqa: F401
from migrations_app.models import MigrationJob

# The preflight command binds run_preflight when its module is first imported; imported
# here, before checklist_calls patches it, so the recorder never leaks into later tests
# (tests/api's call_command("preflight") got it when this file ran first).


class Stop(Exception):
    pass


@pytest.fixture
def shutoff_vm(db):
    a = Host.objects.create(name="ha", uri="test:///default")
    Host.objects.create(name="hb", uri="test:///other")
    return VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e1940", name="web1", host=a, state="shutoff"
    )


@pytest.fixture
def checklist_calls(monkeypatch):
    """run_preflight replaced by a recorder that stops the command before any job."""
    calls = []

    def fake(plan, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(preflight, "run_preflight", fake)
    return calls


@pytest.mark.parametrize(("args", "measured"), [([], True), (["--quick"], False)])
def test_it_measures_the_dirty_rate_unless_quick(shutoff_vm, admin, checklist_calls, args, measured):
    with pytest.raises(Stop):
        call_command("migrate_vm", "web1", "hb", "--mode", "offline", "--user", admin.username, *args)
    assert checklist_calls == [{"measure_dirty_rate": measured}]
    assert not MigrationJob.objects.exists()


def test_it_runs_without_system_checks(shutoff_vm, admin, checklist_calls, monkeypatch):
    """As from the shell (run_from_argv runs the checks of a command that requires them)."""

    def check(self, *a, **kw):
        raise AssertionError("system checks ran")

    monkeypatch.setattr(BaseCommand, "check", check)
    argv = ["web1", "hb", "--mode", "offline"]
    with pytest.raises(Stop):  # reached the checklist: no check on the way
        cmd = load_command_class("migrations_app", "migrate_vm")
        cmd.run_from_argv(["manage.py", "migrate_vm", *argv, "--user", admin.username])
    with pytest.raises(AssertionError, match="system checks ran"):  # a command that checks
        load_command_class("migrations_app", "preflight").run_from_argv(["manage.py", "preflight", *argv])

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


class Inline:
    """migrate_vm's Operation, run on the calling thread (the test database is one
    connection's transaction: a second thread would not see the job row)."""

    def __init__(self, fn, name):
        self.error = self.value = None
        try:
            self.value = fn()
        except BaseException as exc:
            self.error = exc
        self.done = True

    def wait(self, timeout):
        return True


@pytest.fixture
def runs_here(monkeypatch):
    """run_job replaced by a recorder that concludes the job; the command's thread inline."""
    from migrations_app.management.commands import migrate_vm
    from migrations_app.preflight.report import Report

    report = Report(results=[], verdict="pass", started_at="", duration_ms=0)
    monkeypatch.setattr(preflight, "run_preflight", lambda plan, **kw: report)
    monkeypatch.setattr(migrate_vm, "Operation", Inline)
    # The command closes its thread's and its own connections when done; here both are
    # the test's one connection, whose transaction a close would end on PostgreSQL
    # (pass 2 of scripts/test.sh; SQLite ignores a close of its in-memory database).
    monkeypatch.setattr(migrate_vm.connections, "close_all", lambda: None)
    calls = []

    def fake_run_job(job_id, worker=None, **kwargs):
        calls.append(dict(kwargs, job_id=job_id, worker=worker))
        MigrationJob.objects.filter(pk=job_id).update(status=MigrationJob.SUCCEEDED)
        return MigrationJob.SUCCEEDED

    monkeypatch.setattr(migrate_vm.runner, "run_job", fake_run_job)
    return report, calls


def test_it_runs_the_job_in_its_own_process_with_its_own_checklist(shutoff_vm, admin, runs_here, capsys):
    report, calls = runs_here
    call_command(
        "migrate_vm", "web1", "hb", "--mode", "offline", "--user", admin.username, "--wait", "--json"
    )
    job = MigrationJob.objects.get()
    assert job.status == MigrationJob.SUCCEEDED
    assert len(calls) == 1
    (call,) = calls
    assert call["job_id"] == job.pk and call["worker"].startswith("migrate_vm:")
    assert call["checked"] is report and call["defer_sync"] is True
    assert '"status": "succeeded"' in capsys.readouterr().out.splitlines()[-1]


def test_it_leaves_a_job_that_waits_for_its_window_to_the_worker(shutoff_vm, admin, runs_here, monkeypatch):
    """Not due (--not-before later): held for the worker's release, not run here. Without
    --wait the command only creates the job, as before."""
    from migrations_app.management.commands import migrate_vm

    _report, calls = runs_here
    call_command(
        "migrate_vm",
        "web1",
        "hb",
        "--mode",
        "offline",
        "--user",
        admin.username,
        "--not-before",
        "2099-01-01T00:00",
    )
    job = MigrationJob.objects.get()
    assert job.status == MigrationJob.QUEUED and job.waiting_for
    assert migrate_vm.run_here(job, runs_here[0], 0.0) is None
    assert calls == []


def test_it_sends_no_queue_message_for_a_job_it_runs_itself(
    shutoff_vm, admin, runs_here, monkeypatch, django_capture_on_commit_callbacks
):
    """An idle worker woken by the message would race the command's own claim; a job the
    command does not run (no --wait here) gets its message as before."""
    import django_q.tasks

    sent = []
    monkeypatch.setattr(django_q.tasks, "async_task", lambda func, job_id, **kw: sent.append(job_id))
    argv = ["migrate_vm", "web1", "hb", "--mode", "offline", "--user", admin.username]
    with django_capture_on_commit_callbacks(execute=True):
        call_command(*argv, "--wait", "--json")
    assert MigrationJob.objects.get().status == MigrationJob.SUCCEEDED and sent == []
    MigrationJob.objects.all().delete()
    with django_capture_on_commit_callbacks(execute=True):
        call_command(*argv, "--json")
    assert sent == [MigrationJob.objects.get().pk]

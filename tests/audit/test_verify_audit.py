"""manage.py verify_audit: an intact history passes; a tampered row or missing guards fail,
naming the first broken link; exit code 1 on any problem."""

import pytest
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction

from hosts import services as host_services
from hosts.models import Host
from kvmweb.audit import guards, record
from kvmweb.audit.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def events(admin):
    with transaction.atomic():
        return [record("test.event", actor=admin, target_name=f"obj{i}", details={"n": i}) for i in range(5)]


@pytest.fixture
def no_guards():
    """Drop the append-only triggers for the test (the test's transaction is rolled back
    afterwards; reinstall anyway so nothing depends on that)."""
    guards.remove(connection)
    yield
    guards.install(connection)


@pytest.fixture
def run(capsys, monkeypatch):
    """run(*args) -> (exit code, stdout, stderr) of `manage.py verify_audit`, through the
    real command-line entry point (which turns CommandError into the exit status)."""
    from django.core.management import base

    # The entry point closes every connection when done, which would end the test's
    # transaction (PostgreSQL); the test database stays open here.
    monkeypatch.setattr(base.connections, "close_all", lambda: None)

    def _run(*args):
        return _run_command(capsys, *args)

    return _run


def _run_command(capsys, *args):
    try:
        execute_from_command_line(["manage.py", "verify_audit", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_it_passes_an_intact_history(events, run):
    code, out, err = run()
    assert code == 0 and "OK 5 events, chain intact, append-only guards installed" in out and err == ""


def test_it_notices_events_cut_off_the_end_with_an_earlier_hash(events, run):
    code, out, _ = run()
    last = events[-1].hash
    assert code == 0 and f"last hash {last}" in out
    guards.remove(connection)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id >= %s", [events[3].pk])
    guards.install(connection)
    assert run()[0] == 0  # the shorter chain is still a valid chain ...
    code, _, err = run("--expect", last)
    assert code == 1 and f"expected event {last} is missing" in err  # ... but not the one we saw
    assert run("--expect", events[2].hash)[0] == 0


def test_it_refuses_update_and_delete_while_the_guards_are_installed(events):
    assert guards.installed(connection)
    for sql in ("UPDATE audit_auditevent SET outcome = 'failure'", "DELETE FROM audit_auditevent"):
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert AuditEvent.objects.count() == 5


def test_it_names_the_row_edited_with_raw_sql(events, run, no_guards):
    victim = events[2]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE audit_auditevent SET target_name = %s WHERE id = %s", ["forged", victim.pk])
    guards.install(connection)  # guards back: only the chain can tell
    code, out, err = run()
    assert code == 1 and out == ""
    assert f"chain broken at event id={victim.pk} " in err
    assert "action=test.event" in err and "hash does not match the row's contents (row edited)" in err
    assert "(2 events before it verified)" in err


def test_it_names_the_row_after_a_removed_one(events, run, no_guards):
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [events[1].pk])
    guards.install(connection)
    code, _, err = run()
    assert code == 1 and f"id={events[2].pk} " in err and "row removed or inserted" in err


def test_it_fails_when_the_guards_are_missing(events, run, no_guards):
    code, _, err = run()
    assert code == 1 and "append-only guards are missing" in err and "chain broken" not in err


NOOP_TRIGGERS = {
    # Same names as the real guards, bodies that refuse nothing.
    "sqlite": [
        "DROP TRIGGER IF EXISTS audit_no_update",
        "DROP TRIGGER IF EXISTS audit_no_delete",
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_auditevent BEGIN SELECT 1; END",
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_auditevent BEGIN SELECT 1; END",
    ],
    "postgresql": [
        """CREATE OR REPLACE FUNCTION audit_refuse_nothing() RETURNS trigger AS $$
           BEGIN RETURN COALESCE(NEW, OLD); END; $$ LANGUAGE plpgsql""",
        "DROP TRIGGER IF EXISTS audit_no_change ON audit_auditevent",
        """CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit_auditevent
           FOR EACH ROW EXECUTE FUNCTION audit_refuse_nothing()""",
    ],
}


@pytest.fixture
def noop_guards():
    """Replace the guards by same-named triggers that do nothing; put the real ones back."""
    with connection.cursor() as cursor:
        for sql in NOOP_TRIGGERS[connection.vendor]:
            cursor.execute(sql)
    yield
    guards.remove(connection)
    guards.install(connection)


def test_it_checks_the_guards_by_what_they_do_not_by_their_names(events, run, noop_guards):
    assert guards.installed(connection)  # the names alone look right ...
    code, out, err = run()
    assert code == 1 and out == ""  # ... but the audit table accepted changes
    assert "append-only guards are missing or do nothing: the audit table accepted UPDATE and DELETE" in err
    assert "chain broken" not in err  # the probe was rolled back
    assert (
        AuditEvent.objects.count() == 5 and not AuditEvent.objects.filter(action="audit.guard_probe").exists()
    )
    # --install-guards puts the real guards back over the impostors.
    code, out, err = run("--install-guards")
    assert code == 0 and "append-only guards (re)installed" in out and "OK 5 events" in out, err
    assert guards.refusals(connection) == dict.fromkeys(
        ["UPDATE", "DELETE"] + (["TRUNCATE"] if connection.vendor == "postgresql" else []), True
    )


def test_it_leaves_no_trace_of_its_probe(events, run):
    before = list(AuditEvent.objects.order_by("id").values_list("id", "hash"))
    for _ in range(3):
        assert run()[0] == 0
    assert list(AuditEvent.objects.order_by("id").values_list("id", "hash")) == before


def test_it_raises_command_error_with_exit_code_1_from_call_command(events, no_guards):
    with pytest.raises(CommandError) as info:
        call_command("verify_audit")
    assert info.value.returncode == 1


def test_it_records_a_refused_host_registration_as_a_failure(admin):
    with pytest.raises(host_services.HostError):
        host_services.do_register_host("evil", "qemu+ssh://h/system?command=/bin/sh", actor=admin)
    assert not Host.objects.exists()
    event = AuditEvent.objects.get(action="host.register")
    assert event.outcome == AuditEvent.FAILURE and event.actor == admin and event.target_name == "evil"
    assert "command" in event.details["error"]
    assert not AuditEvent.objects.filter(outcome=AuditEvent.SUCCESS).exists()

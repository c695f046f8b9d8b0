"""The audit chain on PostgreSQL: the append-only triggers exist and refuse changes, and
concurrent writers (threads and separate processes) keep one valid chain."""

import threading

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from kvmweb.audit import guards
from kvmweb.audit.models import AuditEvent
from kvmweb.audit.services import record, verify_chain

WRITER = """
import django, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
django.setup()
from kvmweb.audit.services import record
for i in range({n}):
    record("scaleout.process_writer", target_type="proc", target_id="{name}", target_name=str(i),
           details={{"writer": "{name}", "i": i}})
print("done")
"""


def test_it_runs_on_postgresql(db):
    assert connection.vendor == "postgresql"


@pytest.mark.django_db(transaction=True)
def test_it_installs_the_guards_on_postgresql():
    assert guards.installed(connection)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = 'audit_auditevent'::regclass AND NOT tgisinternal ORDER BY tgname"
        )
        triggers = dict(cursor.fetchall())
    assert set(triggers) == {"audit_no_change", "audit_no_truncate"}
    assert "BEFORE DELETE OR UPDATE" in triggers["audit_no_change"]
    assert "BEFORE TRUNCATE" in triggers["audit_no_truncate"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_auditevent SET outcome = 'failure'",
        "DELETE FROM audit_auditevent",
        "TRUNCATE audit_auditevent",
    ],
)
def test_it_refuses_changes_to_audit_rows_in_sql(sql):
    event = record("scaleout.guard_probe", target_type="probe", target_id="1")
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    event.refresh_from_db()
    assert event.outcome == AuditEvent.SUCCESS
    assert AuditEvent.objects.filter(pk=event.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_it_refuses_changes_through_the_orm():
    event = record("scaleout.guard_probe", target_type="probe", target_id="2")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(target_name="forged")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.get(pk=event.pk).target_name == event.target_name


@pytest.mark.django_db(transaction=True)
def test_it_keeps_one_chain_with_concurrent_threads(close_thread_connections):
    threads, errors, per_thread, count = [], [], 25, 6
    start = threading.Barrier(count)

    def writer(n):
        try:
            start.wait()
            for i in range(per_thread):
                record("scaleout.thread_writer", target_type="thread", target_id=str(n), details={"i": i})
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            close_thread_connections()

    for n in range(count):
        threads.append(threading.Thread(target=writer, args=(n,)))
        threads[-1].start()
    for t in threads:
        t.join(60)
    assert not errors
    checked, bad, reason = verify_chain()
    assert bad is None, reason
    assert checked == AuditEvent.objects.count() == count * per_thread
    # No fork: every prev_hash is used exactly once.
    prevs = list(AuditEvent.objects.values_list("prev_hash", flat=True))
    assert len(prevs) == len(set(prevs))


@pytest.mark.django_db(transaction=True)
def test_it_keeps_one_chain_with_concurrent_processes(processes):
    n, names = 40, ["w1", "w2", "w3"]
    procs = [processes.python(WRITER.format(n=n, name=name), name) for name in names]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, processes.logs()
    checked, bad, reason = verify_chain()
    assert bad is None, reason
    assert checked == len(names) * n
    for name in names:
        assert AuditEvent.objects.filter(action="scaleout.process_writer", target_id=name).count() == n


@pytest.mark.django_db(transaction=True)
def test_it_detects_a_row_edited_behind_the_triggers_back():
    """The triggers are not the boundary: with them dropped, an edit is caught by the chain."""
    record("scaleout.a", target_type="t", target_id="1")
    victim = record("scaleout.b", target_type="t", target_id="2")
    record("scaleout.c", target_type="t", target_id="3")
    guards.remove(connection)
    try:
        AuditEvent.objects.filter(pk=victim.pk).update(target_name="forged")
    finally:
        guards.install(connection)
    checked, bad, reason = verify_chain()
    assert checked == 1
    assert bad.pk == victim.pk
    assert "edited" in reason


def test_it_cannot_insert_two_events_with_the_same_hash(db):
    event = record("scaleout.dup", target_type="t", target_id="1")
    clone = AuditEvent(
        at=event.at,
        action=event.action,
        target_type="t",
        target_id="1",
        prev_hash=event.prev_hash,
        hash=event.hash,
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        clone.save(force_insert=True)

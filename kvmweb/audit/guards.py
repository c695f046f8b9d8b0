"""Database triggers that make the audit table append-only, per database vendor.

They stop casual and accidental edits (an admin with a SQL shell, a buggy migration). They
are not the security boundary: someone who can drop a trigger can edit rows, which is why
every row is also HMAC-chained and `manage.py verify_audit` checks the chain.

`refusals` checks the guards by what they do, not by their names: a trigger of the right
name whose body does nothing passes a name check but not this one.
"""

import secrets

from django.db import DatabaseError, transaction

TABLE = "audit_auditevent"

SQLITE_INSTALL = [
    # Drop first: a same-named trigger with another body (a no-op) is replaced.
    "DROP TRIGGER IF EXISTS audit_no_update",
    "DROP TRIGGER IF EXISTS audit_no_delete",
    f"""CREATE TRIGGER audit_no_update BEFORE UPDATE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END""",
    f"""CREATE TRIGGER audit_no_delete BEFORE DELETE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END""",
]
SQLITE_REMOVE = [
    "DROP TRIGGER IF EXISTS audit_no_update",
    "DROP TRIGGER IF EXISTS audit_no_delete",
]
POSTGRES_INSTALL = [
    """CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'audit events are append-only'; END; $$ LANGUAGE plpgsql""",
    f"DROP TRIGGER IF EXISTS audit_no_change ON {TABLE}",
    f"""CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON {TABLE}
        FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()""",
    f"DROP TRIGGER IF EXISTS audit_no_truncate ON {TABLE}",
    f"""CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON {TABLE}
        FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()""",
]
POSTGRES_REMOVE = [
    f"DROP TRIGGER IF EXISTS audit_no_change ON {TABLE}",
    f"DROP TRIGGER IF EXISTS audit_no_truncate ON {TABLE}",
]


def _run(connection, statements):
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def install(connection):
    """Create the append-only triggers (idempotent)."""
    if connection.vendor == "postgresql":
        _run(connection, POSTGRES_INSTALL)
    elif connection.vendor == "sqlite":
        _run(connection, SQLITE_INSTALL)


def remove(connection):
    """Drop the triggers. Only for test teardown (table flush) and the tamper test."""
    if connection.vendor == "postgresql":
        _run(connection, POSTGRES_REMOVE)
    elif connection.vendor == "sqlite":
        _run(connection, SQLITE_REMOVE)


def installed(connection):
    """True when both guards are present."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='trigger' AND name IN "
                "('audit_no_update', 'audit_no_delete')"
            )
        elif connection.vendor == "postgresql":
            cursor.execute(
                "SELECT count(*) FROM pg_trigger WHERE tgname IN "
                "('audit_no_change', 'audit_no_truncate') AND NOT tgisinternal"
            )
        else:
            return False
        return cursor.fetchone()[0] == 2


class _RollBack(Exception):
    pass


def refusals(connection):
    """Try to change the audit table and report what it refused: {statement: refused?}.

    Inside one transaction that is always rolled back: a probe row is inserted (inserts
    are allowed), then an UPDATE and a DELETE of that row (and on PostgreSQL a TRUNCATE)
    are each tried in a savepoint. An intact guard refuses every one; nothing is ever
    committed, whatever the guards do. (On PostgreSQL the id sequence skips one number.)
    """
    from kvmweb.audit.models import AuditEvent
    from kvmweb.audit.services import GENESIS

    statements = [
        ("UPDATE", f"UPDATE {TABLE} SET target_name = 'guard probe: changed' WHERE id = %s"),
        ("DELETE", f"DELETE FROM {TABLE} WHERE id = %s"),
    ]
    if connection.vendor == "postgresql":
        statements.append(("TRUNCATE", f"TRUNCATE {TABLE}"))
    results = {}
    try:
        with transaction.atomic(using=connection.alias):
            from django.utils import timezone

            probe = AuditEvent.objects.using(connection.alias).create(
                at=timezone.now(),
                action="audit.guard_probe",
                details={},
                prev_hash=GENESIS,
                hash=secrets.token_hex(32),
            )
            for verb, sql in statements:
                try:
                    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
                        cursor.execute(sql, [probe.pk] if "%s" in sql else None)
                except DatabaseError:
                    results[verb] = True
                else:
                    results[verb] = False
            raise _RollBack
    except _RollBack:
        pass
    return results

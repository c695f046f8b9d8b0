"""The one function that changes a job's status.

``transition(job, to, ...)`` is a conditional UPDATE from the states the table in
migrations_app/states.py allows (or a narrower set the caller names), and in the same
transaction: the ``progress_seq`` bump watchers key on, the job-log line, the audit
event; the watchers are woken once the transaction commits. It returns False when the row
was no longer in an allowed state: someone else (another delivery of the task, a cancel,
reconcile) got there first, and the caller must not act as if it had moved the job.
Nothing else in kvmweb writes ``MigrationJob.status``.
"""

from django.db import transaction
from django.db.models import F
from django.utils import timezone, translation

from kvmweb import qbroker
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from migrations_app import states
from migrations_app.events import COLLAPSING, render
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.streaming import publish_job

# Sent (kvmweb/qbroker.py wake) to the processes on this machine listening for a job's
# end once a final state is committed: fleet/scheduler.py wait_for_work, which otherwise
# finds it by polling the database.
ENDED = "job-ended"


class IllegalTransition(ValueError):
    """A caller asked for a move the table does not allow (a programming error)."""


def transition(
    job_id,
    to,
    *,
    from_=None,
    event=None,
    level="info",
    audit=None,
    actor=None,
    request=None,
    outcome=None,
    details=None,
    where=None,
    **fields,
):
    """Move job ``job_id`` to state ``to`` from one of ``from_`` (default: every state
    the table allows), setting ``fields`` too. ``event`` is a job-log line (text, or a
    (code, params) pair for migrations_app/events.py); ``audit`` an audit action name
    written with ``details`` (the job's identity is added); ``where`` a Q the row must
    also match (part of the same conditional UPDATE). Returns True when it moved."""
    allowed = states.sources_of(to)
    wanted = tuple(from_) if from_ is not None else allowed
    illegal = [s for s in wanted if s not in allowed]
    if illegal or not wanted:
        raise IllegalTransition(f"a job cannot go from {', '.join(illegal) or 'nowhere'} to {to}")
    now = timezone.now()
    if to in states.FINAL:
        fields.setdefault("finished_at", now)
    rows = MigrationJob.objects.filter(pk=job_id, status__in=wanted)
    if where is not None:
        rows = rows.filter(where)
        # A join would make Django write UPDATE ... WHERE id IN (SELECT ... status ...):
        # PostgreSQL re-checks only the outer WHERE after waiting for a concurrent update,
        # so two workers could both claim the job. ``where`` names the job's own columns
        # (subqueries on them are fine).
        query = rows.query
        if sum(1 for alias in query.alias_map if query.alias_refcount[alias]) > 1:
            raise ValueError("transition(where=...) must not join other tables")
    with transaction.atomic():
        moved = rows.update(status=to, progress_seq=F("progress_seq") + 1, **fields)
        if not moved:
            return False
        if event is not None:
            write_event(job_id, event, level)
        if audit:
            job = MigrationJob.objects.get(pk=job_id)
            base = {
                "job": job.pk,
                "vm": job.vm_name,
                "source": job.source_name,
                "target": job.target_name,
                "mode": job.mode,
                "status": to,
            }
            base.update(details or {})
            if outcome is None:
                outcome = AuditEvent.FAILURE if to in (states.FAILED,) else AuditEvent.SUCCESS
            record(audit, actor=actor, request=request, target=job, outcome=outcome, details=base)
        transaction.on_commit(lambda: publish_job(job_id))
        if to in states.FINAL:
            transaction.on_commit(lambda: qbroker.wake(ENDED))
    return True


def write_event(job_id, event, level="info"):
    """Append a job-log line: ``event`` is text, or a (code, params) pair rendered in the
    viewer's language later (the English text is stored too). A line of a collapsing code
    (events.COLLAPSING: the memory pass counter) replaces the job's earlier one, so a job
    with 1,000 passes keeps one line. Bumps ``progress_seq`` so watchers re-render."""
    if isinstance(event, tuple):
        code, params = event
        with translation.override("en"):
            message = render(code, params, code)
    else:
        code, params, message = "", {}, str(event)
    message = message[:2000]
    # One transaction (joined when the caller has one): on SQLite each takes the write
    # lock every running job shares, and the line and its progress_seq bump go together.
    with transaction.atomic(savepoint=False):
        if code in COLLAPSING:
            # Replaced by a new row (not updated in place): live watchers pick up new rows
            # by id, and the page keeps only the newest line of the code (static/js/job.js).
            JobEvent.objects.filter(job_id=job_id, code=code).delete()
        JobEvent.objects.create(job_id=job_id, level=level, code=code, params=params, message=message)
        MigrationJob.objects.filter(pk=job_id).update(progress_seq=F("progress_seq") + 1)

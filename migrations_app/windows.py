"""Windows of single jobs: not before T, not after T2, and gates such as host-group
blackouts that hold a job back while they last.

How a job with a window runs (crash safe, no timer in any process's memory):

- ``do_create_job`` creates a job whose ``not_before`` lies ahead QUEUED with
  ``waiting_for`` set and does not queue its task.
- The runner's claim (queued -> preflight) is one conditional UPDATE that also requires
  ``claim_condition(now)``: the window is open and no gate holds the job. A claim that
  finds the job not due sets ``waiting_for`` (the reason shown on the job page) and leaves
  it QUEUED; nothing else happens, whoever delivered the message.
- ``release_due`` (every reconcile pass, i.e. every few seconds from the django-q2
  schedule on the default cluster, and when a migrations worker starts) queues the held
  jobs whose time came (clearing ``waiting_for`` and queueing in one transaction, the
  message sent on commit) and ends the jobs whose window closed as cancelled with the
  "missed window" reason. The job row is the only state, so a restart of any process
  loses nothing: a release whose message was lost is re-queued by
  migrations_app.reconcile.requeue_lost like any other queued job.

Gates: other apps register a gate (``register_gate``); the fleet app registers the
host-group blackouts and the batches' limits (fleet/apps.py, fleet/limits.py: its
condition counts other jobs, so the claim runs inside ``claiming``, which takes the
gates' locks first). This module does not import them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext as _

from kvmweb.audit.models import AuditEvent
from migrations_app import events, states

_gates = []


class WindowError(ValueError):
    """A window that cannot be used (unreadable, closes before it opens, already over)."""


@dataclass
class Gate:
    """Something that holds jobs back meanwhile (a blackout).

    ``condition(now)``: a Q on MigrationJob that holds when the gate lets the job start
    (part of the claim's conditional UPDATE). ``blocker(source, target, now)``: the
    sentence saying why it does not, or "" (the creation refusal, the job page).
    Optional: ``lock(job_id)``, taken inside the claim's transaction before its UPDATE
    (``claiming``: a condition that counts other rows needs it on PostgreSQL, see
    fleet/limits.py); ``holds(job, now)``, why the gate holds this queued job back ("" when
    it does not), for a condition that depends on more than the job's hosts;
    ``successor(job_id)``, a queued job the worker that just ended ``job_id`` may claim
    and run at once (a slot it freed); ``chains(job_id)``, True when such a successor may
    follow this job (its worker then queues the full inventory sync instead of running
    it, tasks.run_migration); ``releases(job)``, True when the gate's owner releases this
    held job itself, in an order of its own (``release_due`` then leaves it alone);
    ``upcoming(job_id)``, the job ``successor`` will most likely name once ``job_id`` has
    ended, asked while it still runs (its worker checks that job meanwhile);
    ``applies(job_id)``, False when the gate can never hold that job, whatever happens
    later (its condition is then left out of that job's claim)."""

    name: str
    condition: object
    blocker: object
    lock: object = None
    holds: object = None
    successor: object = None
    chains: object = None
    releases: object = None
    upcoming: object = None
    applies: object = None


def register_gate(gate):
    """Add a gate (idempotent by name: AppConfig.ready may run twice in tests)."""
    _gates[:] = [g for g in _gates if g.name != gate.name] + [gate]


def gates():
    return list(_gates)


def parse_when(value):
    """An ISO date-time (a naive one is in the server's time zone), None for empty."""
    if value in (None, ""):
        return None
    if hasattr(value, "tzinfo"):
        when = value
    else:
        when = parse_datetime(str(value).strip())
        if when is None:
            raise WindowError(_("%(v)s is not a date and time (YYYY-MM-DDTHH:MM).") % {"v": value})
    return when if timezone.is_aware(when) else timezone.make_aware(when)


def clean_window(not_before=None, not_after=None, now=None):
    """(not_before, not_after) checked: readable, closing after it opens and in the future."""
    now = now or timezone.now()
    not_before, not_after = parse_when(not_before), parse_when(not_after)
    if not_before and not_after and not_after <= not_before:
        raise WindowError(_("The window closes before it opens."))
    if not_after and not_after <= now:
        raise WindowError(_("The window is already closed (not after %(t)s).") % {"t": fmt(not_after)})
    return not_before, not_after


def fmt(when):
    return timezone.localtime(when).strftime("%Y-%m-%d %H:%M:%S %Z")


def window_condition(now):
    """The window part of the claim: opened, not closed."""
    return (Q(not_before__isnull=True) | Q(not_before__lte=now)) & (
        Q(not_after__isnull=True) | Q(not_after__gte=now)
    )


def claim_condition(now, job_id=None):
    """What the runner's claim requires besides the state: window open, no gate holding.
    With ``job_id``, a gate that says it can never hold that job (``applies``) is left
    out: compiling the batch limits' subqueries was 3-4 of a single job's 5-6 ms claim
    (Django's SQL compiler; the query itself takes ~1 ms)."""
    cond = window_condition(now)
    for gate in _gates:
        if job_id is not None and gate.applies is not None and not gate.applies(job_id):
            continue
        cond &= gate.condition(now)
    return cond


@contextmanager
def claiming(job_id):
    """The transaction of a claim: every gate's lock first, then the caller's
    conditional UPDATE (runner.run_job), committed together."""
    with transaction.atomic():
        for gate in _gates:
            if gate.lock is not None:
                gate.lock(job_id)
        yield


def successor(job_id):
    """A queued job a gate lets the worker that just ended ``job_id`` run next, or None."""
    return _first_answer("successor", job_id)


def upcoming(job_id):
    """The queued job a gate expects to name as ``job_id``'s successor once it ends
    (a guess: ``successor`` and the claim decide), or None."""
    return _first_answer("upcoming", job_id)


def _first_answer(hook, job_id):
    for gate in _gates:
        ask = getattr(gate, hook)
        if ask is not None:
            found = ask(job_id)
            if found is not None:
                return found
    return None


def chains(job_id):
    """True when a gate says a successor may follow job ``job_id`` on its worker."""
    return any(gate.chains(job_id) for gate in _gates if gate.chains is not None)


def blocker(source, target, now=None):
    """Why a job from ``source`` to ``target`` may not start now ("" when it may)."""
    now = now or timezone.now()
    for gate in _gates:
        text = gate.blocker(source, target, now)
        if text:
            return text
    return ""


def why_not_due(job, now=None):
    """The reason a QUEUED job may not be claimed now ("" when it may)."""
    now = now or timezone.now()
    if job.not_after and now > job.not_after:
        return _("Its window closed at %(t)s.") % {"t": fmt(job.not_after)}
    if job.not_before and now < job.not_before:
        return _("Scheduled: starts at %(t)s.") % {"t": fmt(job.not_before)}
    if not job.ignore_blackouts:
        text = blocker(job.source, job.target, now)
        if text:
            return text
    for gate in _gates:
        text = gate.holds(job, now) if gate.holds is not None else ""
        if text:
            return text
    return ""


def hold(job_id, reason):
    """Leave a QUEUED job waiting with ``reason`` (its page shows it; release_due picks
    it up). A log line only when the reason changes."""
    from migrations_app.lifecycle import write_event
    from migrations_app.models import MigrationJob

    reason = reason[:500]
    with transaction.atomic():
        if (
            MigrationJob.objects.filter(pk=job_id, status=states.QUEUED)
            .exclude(waiting_for=reason)
            .update(waiting_for=reason)
        ):
            write_event(job_id, ("waiting", {"reason": reason}))
    from migrations_app.streaming import publish_job

    publish_job(job_id)


def miss(job, now=None):
    """End a job that was not started before its window closed: cancelled, with the
    "missed window" reason (the table has no separate state: like a cancel it ends before
    anything ran, the VM untouched). Conditional: False when it moved meanwhile."""
    from migrations_app.lifecycle import transition

    # The event line's sentence, stored coded so the job page shows it in each viewer's language.
    error_parts = events.parts(("missed_window", {"at": fmt(job.not_after)}))
    return transition(
        job.pk,
        states.CANCELLED,
        from_=[states.QUEUED, states.PENDING_APPROVAL],
        where=Q(not_after__lt=now or timezone.now()),
        error=events.english(error_parts),
        error_parts=error_parts,
        waiting_for="",
        result={"missed_window": job.not_after.isoformat()},
        event=("missed_window", {"at": fmt(job.not_after)}),
        level="warn",
        audit="migration.missed_window",
        outcome=AuditEvent.FAILURE,
        details={"not_after": job.not_after.isoformat()},
    )


def release_due(now=None):
    """One pass: end the jobs whose window closed, queue the held jobs that may start.
    Returns {"missed": [ids], "released": [ids]}."""
    from migrations_app.models import MigrationJob

    now = now or timezone.now()
    out = {"missed": [], "released": []}
    closed = MigrationJob.objects.filter(
        status__in=[states.QUEUED, states.PENDING_APPROVAL], not_after__lt=now
    ).select_related("source", "target")
    for job in closed:
        if miss(job, now):
            out["missed"].append(job.pk)
    held = MigrationJob.objects.filter(status=states.QUEUED).exclude(waiting_for="")
    for job in held.select_related("source", "target"):
        reason = why_not_due(job, now)
        if reason:
            if reason != job.waiting_for:
                hold(job.pk, reason)
            continue
        if any(gate.releases(job) for gate in _gates if gate.releases is not None):
            continue  # its owner releases it, in its order (a batch: first rows first)
        if release(job):
            out["released"].append(job.pk)
    return out


def release(job):
    """Queue a held job (``waiting_for`` set) again; True when this call released it."""
    from migrations_app.lifecycle import write_event
    from migrations_app.models import MigrationJob
    from migrations_app.services import enqueue

    with transaction.atomic():
        # Conditional on the reason it was held with: two passes (the reconcile pass and a
        # batch's scheduler) release it once, and a duplicate message would be harmless:
        # the claim lets one in.
        if MigrationJob.objects.filter(pk=job.pk, status=states.QUEUED, waiting_for=job.waiting_for).update(
            waiting_for=""
        ):
            write_event(job.pk, ("released", {}))
            enqueue(job)
            return True
    return False

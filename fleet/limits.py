"""The batches' limits, enforced where a child starts: at the worker's claim.

A batch child may be created before a slot is free ("pipelined", fleet/scheduler.py),
so the limits (per batch, per source host outbound, per target host inbound, global)
cannot be left to the scheduler that creates children: the worker's claim
(migrations_app/runner.run_job, queued -> preflight) enforces them, as part of its one
conditional UPDATE, through a gate registered in fleet/apps.py
(migrations_app/windows.py: ``claim_condition`` ANDs every gate's condition).

What counts against a limit: the jobs a worker (or reconcile) holds, i.e. claimed and
not ended (preflight, running, cancelling, needs_reconcile), of all kvmweb, not only
batch children; per batch, that batch's claimed children. A queued job holds no slot,
nor does a batch child whose VM has landed on the target while its worker concludes it
beside the next child's start (``landed_at`` set, phase ``states.LANDED``,
migrations_app/jobrun.py conclude_success): its migration stream is over. The batch's
pass counts such a child until it ends (fleet/scheduler.py): it starts and releases
nothing on a fresh landing; the worker that landed it does (``successor``).

Why a lock as well as the condition (SQLite vs PostgreSQL):

- SQLite: kvmweb opens every transaction with BEGIN IMMEDIATE (settings), so writers are
  serialized, and one UPDATE statement reads its count subqueries and writes its row
  under the same write lock: two claims can never both see room for one slot.
- PostgreSQL, READ COMMITTED (Django's default): each statement reads a snapshot taken
  when it starts. Two workers claiming two *different* child rows at once update
  different rows, so nothing makes either wait: both count subqueries see the other's
  claim as not yet committed, both find one slot free, and both claim it (the limit is
  exceeded by one). A conditional UPDATE protects one row against itself, not a count
  over other rows. Hence every claim first updates the one ``ClaimLock`` row in the
  same transaction (``lock``, called by windows.claiming before the claim's UPDATE): a
  second claim waits on that row lock until the first one commits (or rolls back), and
  its claim UPDATE, a later statement, then takes a fresh snapshot that includes the
  first claim. One row for every claim (not one per batch): the source, target and
  global limits span batches and single jobs. A claim holds it for a few milliseconds
  (one UPDATE and its log line); migrations themselves never hold it. Under REPEATABLE
  READ or SERIALIZABLE the second claim would fail with a serialization error instead
  (never exceed a limit either), but kvmweb does not use them.
- Order: a child created ahead is held (``waiting_for`` set) from its creation, and the
  claim refuses a held child, so it starts only once released: by the worker that
  frees a slot (``successor``) or by the batch's pass (scheduler._release_first_held),
  both first rows first. Its own first message, refused, can never take a freed slot
  before an earlier row.
- What changes counts without this lock is harmless: a job ending only frees room (a
  claim that missed it waits for the next chance), and reconcile moves a job between
  states that both count.
"""

from __future__ import annotations

from django.db.models import Exists, F, Func, OuterRef, Q, Subquery, Value
from django.db.models.lookups import LessThan
from django.utils.translation import gettext as _

from migrations_app import states

# Held by a worker or reconcile: what fills a slot (less a landed child: ``holding``).
CLAIMED = tuple(s for s in states.ACTIVE if s not in (states.QUEUED, states.PENDING_APPROVAL))


def holding():
    """The jobs that fill a slot now: claimed, not ended, not landed (module docstring)."""
    from migrations_app.models import MigrationJob

    return MigrationJob.objects.filter(status__in=CLAIMED, landed_at__isnull=True)


def _count(queryset):
    """SELECT COUNT(id) of ``queryset`` as a subquery (no GROUP BY: always one row)."""
    return Subquery(queryset.order_by().annotate(n=Func(F("pk"), function="COUNT")).values("n")[:1])


def condition(now=None):
    """The limits as a Q on MigrationJob for the claim's UPDATE: not a batch child, or a
    child of a running batch, not held, with room under all four limits. Not held
    (``waiting_for`` empty): a child created ahead, or refused once, starts only when it
    is released (``successor``, the scheduler's pass), first rows first; otherwise the
    first message of a child created later could take a freed slot before it."""
    return ~Q(Exists(_item())) | (Q(waiting_for="") & room())


def _item():
    from fleet.models import BatchItem

    return BatchItem.objects.filter(job_id=OuterRef("pk"))


def room():
    """Q on MigrationJob: a child of a running batch with room under all four limits.
    Subqueries on the job's own columns only (transition(where=...) refuses joins:
    PostgreSQL would not re-check a joined UPDATE ... WHERE id IN (SELECT ...) after a
    concurrent claim)."""
    from fleet.models import Batch
    from fleet.scheduler import global_limit

    batch = Batch.objects.filter(items__job_id=OuterRef("pk"))
    claimed = holding()

    def limit(field):
        return Subquery(batch.values(field)[:1])

    return (
        Q(Exists(batch.filter(status=Batch.RUNNING)))
        & Q(
            LessThan(
                _count(claimed.filter(batch_item__batch__items__job_id=OuterRef("pk"))), limit("max_parallel")
            )
        )
        & Q(LessThan(_count(claimed.filter(source_id=OuterRef("source_id"))), limit("per_source")))
        & Q(LessThan(_count(claimed.filter(target_id=OuterRef("target_id"))), limit("per_target")))
        & Q(LessThan(_count(claimed), Value(global_limit())))
    )


def lock(job_id):
    """Serialize claims (module docstring): update the one ClaimLock row inside the
    claim's transaction, before its UPDATE. The row is created by the migration; a test
    database flushed between tests lacks it, so it is created on first use."""
    from fleet.models import ClaimLock

    if not ClaimLock.objects.filter(pk=1).update(claims=F("claims") + 1):
        ClaimLock.objects.get_or_create(pk=1)
        ClaimLock.objects.filter(pk=1).update(claims=F("claims") + 1)


def holds(job, now=None):
    """Why the limits hold back this queued job ("" when they do not): the job page,
    windows.release_due and the batch's pass (which release a held job only on "") read
    it. Decided by ``room()``, the claim's own condition less the hold itself, so the
    release and the claim never disagree; the sentence only names what is full."""
    from fleet.models import Batch, BatchItem
    from fleet.scheduler import global_limit
    from migrations_app.models import MigrationJob

    item = BatchItem.objects.filter(job_id=job.pk).select_related("batch").first()
    if item is None or MigrationJob.objects.filter(pk=job.pk).filter(room()).exists():
        return ""
    batch = item.batch
    if batch.status != Batch.RUNNING:
        return _("Batch #%(b)d is %(s)s: none of its children starts meanwhile.") % {
            "b": batch.pk,
            "s": batch.get_status_display(),
        }
    claimed = holding()
    full = []
    if claimed.filter(batch_item__batch=batch).count() >= batch.max_parallel:
        full.append(_("batch #%(b)d runs %(n)d") % {"b": batch.pk, "n": batch.max_parallel})
    if claimed.filter(source_id=job.source_id).count() >= batch.per_source:
        full.append(_("%(h)s sends %(n)d") % {"h": job.source_name, "n": batch.per_source})
    if claimed.filter(target_id=job.target_id).count() >= batch.per_target:
        full.append(_("%(h)s receives %(n)d") % {"h": job.target_name, "n": batch.per_target})
    if claimed.count() >= global_limit():
        full.append(_("%(n)d run in all") % {"n": global_limit()})
    return _("Waiting for a free slot (%(full)s); it starts as soon as one ends.") % {
        "full": "; ".join(full) or _("limits full")
    }


def successor(job_id):
    """The batch child a worker that just ended job ``job_id`` may start at once: the
    first queued child (by batch, then row order) of a running batch that the limits
    let in now, released (``waiting_for`` cleared, no message: this worker claims it
    next), or None. Read without the lock: the claim decides. A worker that dies
    between the release and its claim leaves a queued child without a message, which
    the batch's pass queues again (scheduler._rescue_children)."""
    from django.utils import timezone

    from fleet.models import Batch, BatchItem
    from migrations_app import windows
    from migrations_app.jobrun import writing
    from migrations_app.models import MigrationJob

    # The rest of the claim's condition (its window, the other gates: a blackout): a child
    # they hold would be released only to be refused at the claim and held again, and the
    # worker would never get past it to a child that may start.
    now = timezone.now()
    others = windows.window_condition(now)
    for gate in windows.gates():
        if gate.condition is not condition:
            others &= gate.condition(now)
    candidates = (
        MigrationJob.objects.filter(
            status=states.QUEUED,
            batch_item__status=BatchItem.STARTED,
            batch_item__batch__status=Batch.RUNNING,
        )
        .exclude(pk=job_id)
        .filter(room())
        .filter(others)
        # "Stop on first failure": a failed child (its item not followed yet, or
        # followed) must stop the batch before anything else starts, which the batch's
        # pass does (scheduler.tick); the worker that ran it must not start the next.
        .exclude(batch_item__batch__stop_on_failure=True, batch_item__batch__in=_failed_batches())
        .order_by("batch_item__batch_id", "batch_item__position", "batch_item__id")
        .values_list("pk", flat=True)
    )
    # Released while queued and held, whatever the hold's words: a reason refreshed
    # meanwhile (its own message refused at the same moment) must not hand the slot to a
    # later row; whatever holds it now is checked again by the claim. A child no longer
    # held is another worker's: released by it a moment ago (two children of a wave land
    # together and both workers ask at once: the second one's claim of the same child
    # was refused, and it re-checked the next one at its claim, ~200 ms per wave), or
    # started with room, its message on the way. This worker takes the next one.
    for pk in candidates[:5]:
        # In the writers' queue (jobrun.writing): outside it, this UPDATE polled for
        # SQLite's lock while the claims and conclusions queued there handed it to each
        # other, and waited up to 300 ms (benchmarks/evacuate.py).
        with writing():
            released = (
                MigrationJob.objects.filter(pk=pk, status=states.QUEUED)
                .exclude(waiting_for="")
                .update(waiting_for="")
            )
        if released:
            return pk
    return None


def upcoming(job_id):
    """The child ``successor`` will most likely return once job ``job_id`` (a batch
    child) has freed its slot: of the same running batch's queued children still held,
    in row order (one released a moment ago is another worker's, as in ``successor``),
    the one at job ``job_id``'s own place among the batch's children that still hold a
    slot, by their start (the first started lands first, as a rule, and its worker
    takes the first held child); the first one once job ``job_id`` has landed (whatever
    the others do, its worker asks for a successor now). Read while the slot may still be taken, so without the
    limits: the worker re-checks that child meanwhile (tasks.run_migration), and uses
    the result only if it then claims that very child.

    Two workers whose children land within a second of each other both guessed the
    first held child (its early re-check ran twice, and the other worker's next child
    was checked only after its landing: benchmarks/evacuate.py --trace)."""
    from fleet.models import Batch, BatchItem
    from migrations_app.models import MigrationJob

    batch_id = BatchItem.objects.filter(job_id=job_id).values_list("batch_id", flat=True).first()
    if batch_id is None:
        return None
    started, landed = MigrationJob.objects.filter(pk=job_id).values_list(
        "started_at", "landed_at"
    ).first() or (None, None)
    place = 0
    if started is not None and landed is None:  # landed: its worker asks for a successor now
        place = (
            holding().filter(batch_item__batch_id=batch_id, started_at__lt=started).exclude(pk=job_id).count()
        )
    held = (
        MigrationJob.objects.filter(
            status=states.QUEUED,
            batch_item__batch_id=batch_id,
            batch_item__status=BatchItem.STARTED,
            batch_item__batch__status=Batch.RUNNING,
        )
        .exclude(pk=job_id)
        .exclude(waiting_for="")
        .order_by("batch_item__position", "batch_item__id")
        .values_list("pk", flat=True)
    )
    guesses = list(held[: place + 1])  # fewer held than running: the last one left
    return guesses[-1] if guesses else None


def _failed_batches():
    """Batches with a failed child: its item failed, or its job ended failed or rejected
    and the batch's pass has not followed it yet."""
    from fleet.models import Batch, BatchItem

    failed = Q(items__status=BatchItem.FAILED) | Q(
        items__status=BatchItem.STARTED, items__job__status__in=[states.FAILED, states.REJECTED]
    )
    return Batch.objects.filter(failed).values("pk")


def is_child(job_id):
    """Whether job ``job_id`` is a batch child. Fixed from its creation: the scheduler
    creates a child and links its item in one transaction (scheduler._start_item), and
    no item is linked to a job later. So the limits never hold a job without one, and
    its claim leaves them out (windows.claim_condition)."""
    from fleet.models import BatchItem

    return BatchItem.objects.filter(job_id=job_id).exists()


def limits_gate():
    """The limits as a gate of migrations_app/windows.py."""
    from migrations_app.windows import Gate

    return Gate(
        "fleet-limits",
        condition,
        lambda source, target, now: "",  # a single job's request is never refused by them
        lock=lock,
        holds=holds,
        successor=successor,
        upcoming=upcoming,
        chains=is_child,
        # A batch's held children are released by the batch (``successor``, the pass's
        # scheduler._release_first_held), first rows first and one at a time: released by
        # windows.release_due as well, two of them would race for one freed slot.
        releases=lambda job: is_child(job.pk),
        applies=is_child,
    )

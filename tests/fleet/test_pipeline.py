"""Pipelined batch children: created ahead while the limits are full, held at the
worker's claim (which enforces the limits, fleet/limits.py) until a slot frees, then
claimed by the worker that freed it or released by the scheduler's pass; withdrawn when
the batch is paused or cancelled. The claim is the real runner.run_job claim; only the
migration after it is left out."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connections
from django.utils import timezone

from fleet import limits, scheduler, services
from fleet.models import Batch, BatchItem
from hosts.models import VM
from kvmweb.audit.models import AuditEvent
from migrations_app import runner, tasks, windows
from migrations_app.models import JobEvent, MigrationJob


@pytest.fixture(autouse=True)
def _one_ahead(settings):
    """One child created ahead per batch, unless a test says otherwise (default 2)."""
    settings.KVMWEB_FLEET_PIPELINE = 1


@pytest.fixture
def worker(monkeypatch):
    """runner.run_job through its real claim; the migration itself is replaced: the job
    stays claimed (preflight), or ends as ``worker.ends`` says (job id -> final status)."""

    class Worker:
        ran = []
        ends = {}

        def run(self, run):
            self.ran.append(run.job.pk)
            status = self.ends.get(run.job.pk)
            if status:
                _end(run.job, status)

    w = Worker()
    monkeypatch.setattr(runner, "_run", w.run)
    return w


def _end(job, status=MigrationJob.SUCCEEDED):
    """What a worker's conclusion does to the row (and the VM, when it moved)."""
    MigrationJob.objects.filter(pk=job.pk).update(status=status, waiting_for="")
    if status == MigrationJob.SUCCEEDED:
        VM.objects.filter(pk=job.vm_id).update(host=job.target)


def _claimed():
    return MigrationJob.objects.filter(status__in=limits.CLAIMED)


def _two_running_and_one_ahead(batch_of, **limits_):
    """A batch of 4 (2 per source): two children claimed, the third created ahead."""
    batch = batch_of(4, per_source=2, **limits_)
    scheduler.tick(batch.pk)
    first, second = MigrationJob.objects.order_by("pk")
    # Nothing ahead while the children created are not claimed yet: each of them is
    # already the next one to take a slot.
    assert MigrationJob.objects.count() == 2
    assert runner.run_job(first.pk) == MigrationJob.PREFLIGHT
    assert runner.run_job(second.pk) == MigrationJob.PREFLIGHT
    scheduler.tick(batch.pk)
    third = MigrationJob.objects.latest("pk")
    assert MigrationJob.objects.count() == 3 and third.status == MigrationJob.QUEUED
    return batch, first, second, third


def _two_running_and_two_ahead(batch_of, settings, monkeypatch):
    """A batch of 5 (2 per source, 2 at once, 2 created ahead): two children claimed, the
    third and fourth created ahead; the messages sent from then on are recorded."""
    settings.KVMWEB_FLEET_PIPELINE = 2
    sent = []
    batch = batch_of(5, per_source=2, max_parallel=2)
    scheduler.tick(batch.pk)
    first, second = MigrationJob.objects.order_by("pk")
    runner.run_job(first.pk)
    runner.run_job(second.pk)
    scheduler.tick(batch.pk)
    third, fourth = MigrationJob.objects.filter(status=MigrationJob.QUEUED).order_by("batch_item__position")
    monkeypatch.setattr("migrations_app.services.enqueue", lambda job: sent.append(job.pk))
    return batch, first, second, third, fourth, sent


def test_it_creates_the_next_child_ahead_and_lets_it_start_only_when_a_slot_frees(batch_of, worker):
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    item = third.batch_item
    # The first pending row, in order, is the one created ahead; audited as such.
    assert item.position == min(
        batch.items.exclude(job__in=[first, second]).values_list("position", flat=True)
    )
    assert AuditEvent.objects.filter(
        action="batch.decision", details__job=third.pk, details__pipelined=True
    ).exists()
    # Its worker's claim is refused by the source limit: held with the reason.
    assert runner.run_job(third.pk) is None
    third.refresh_from_db()
    assert third.status == MigrationJob.QUEUED and "Waiting for a free slot" in third.waiting_for
    assert "ha sends 2" in third.waiting_for and _claimed().count() == 2
    assert windows.successor(second.pk) is None  # nothing may start while both run
    scheduler.tick(batch.pk)  # one ahead per batch: no fourth child, the third stays held
    third.refresh_from_db()
    assert MigrationJob.objects.count() == 3 and third.waiting_for
    _end(first)
    assert windows.successor(first.pk) == third.pk
    assert runner.run_job(third.pk) == MigrationJob.PREFLIGHT
    third.refresh_from_db()
    assert third.waiting_for == "" and _claimed().count() == 2


def test_it_runs_the_next_child_in_the_worker_that_freed_the_slot(batch_of, worker, monkeypatch):
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.QUEUED)  # its message arrives
    worker.ends = {first.pk: MigrationJob.SUCCEEDED, third.pk: MigrationJob.SUCCEEDED}
    run_job, deferred = runner.run_job, []

    def recording(job_id, **kwargs):
        deferred.append((job_id, kwargs.get("defer_sync")))
        return run_job(job_id, **kwargs)

    monkeypatch.setattr(runner, "run_job", recording)
    tasks.run_migration(first.pk)
    # Each batch child's full inventory sync goes to the default cluster, so the worker
    # is free for the next child at once.
    assert deferred == [(first.pk, True), (third.pk, True)]
    # One task: the first job, then the child created ahead, claimed the moment the
    # first ended (no queue round trip), and nothing more (the fourth is not created yet).
    assert worker.ran[-2:] == [first.pk, third.pk]
    assert MigrationJob.objects.get(pk=third.pk).status == MigrationJob.SUCCEEDED
    assert MigrationJob.objects.get(pk=second.pk).status == MigrationJob.PREFLIGHT
    # A worker whose claim found nothing to do does not go looking for more work.
    ran = len(worker.ran)
    assert tasks.run_migration(third.pk) is None and len(worker.ran) == ran


def test_it_releases_a_held_child_at_the_next_pass_when_no_worker_chained_it(batch_of, worker, monkeypatch):
    sent = []
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    monkeypatch.setattr("migrations_app.services.enqueue", lambda job: sent.append(job.pk))
    runner.run_job(third.pk)  # held: the limit is full
    for _ in range(3):
        scheduler.tick(batch.pk)
    assert sent == []  # no message while it cannot start (no re-send storm)
    _end(first)
    # Just ended: left to the worker that ended it (it claims the next child itself), so
    # no second worker gets a message only to be refused.
    MigrationJob.objects.filter(pk=first.pk).update(finished_at=timezone.now())
    monkeypatch.setattr(scheduler, "SUCCESSOR_GRACE", 60.0)  # however slow this machine is
    scheduler.tick(batch.pk)
    assert sent == [] and MigrationJob.objects.get(pk=third.pk).waiting_for
    # That worker died after concluding it, say: a pass after the grace releases the child.
    monkeypatch.setattr(scheduler, "SUCCESSOR_GRACE", 0.5)
    MigrationJob.objects.filter(pk=first.pk).update(finished_at=timezone.now() - timedelta(seconds=1))
    scheduler.tick(batch.pk)
    third.refresh_from_db()
    assert sent == [third.pk] and third.waiting_for == "" and third.status == MigrationJob.QUEUED


def test_it_sends_no_message_for_a_child_created_ahead(batch_of, worker, django_capture_on_commit_callbacks):
    """A child created while the limits are full could only be refused at a worker's
    claim: it is created held and without a message; its release sends one."""
    from django_q.models import OrmQ

    def messages():
        return OrmQ.objects.filter(key="migrations").count()

    batch = batch_of(4, per_source=2)
    with django_capture_on_commit_callbacks(execute=True):
        scheduler.tick(batch.pk)
    first, second = MigrationJob.objects.order_by("pk")
    assert messages() == 2
    runner.run_job(first.pk)
    runner.run_job(second.pk)
    with django_capture_on_commit_callbacks(execute=True):
        scheduler.tick(batch.pk)
    third = MigrationJob.objects.latest("pk")
    assert third.status == MigrationJob.QUEUED and third.waiting_for and messages() == 2
    _end(first)
    with django_capture_on_commit_callbacks(execute=True):
        scheduler.tick(batch.pk)
    assert MigrationJob.objects.get(pk=third.pk).waiting_for == "" and messages() == 3


def test_it_withdraws_a_child_created_ahead_when_the_batch_is_paused_or_cancelled(batch_of, worker, operator):
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    row = third.batch_item
    services.do_pause_batch(batch, operator)
    assert runner.run_job(third.pk) is None  # a paused batch's child is not claimed
    scheduler.tick(batch.pk)
    third.refresh_from_db()
    row.refresh_from_db()
    assert third.status == MigrationJob.CANCELLED and third.started_at is None
    assert row.status == BatchItem.PENDING and row.job is None and row.previous_jobs == [third.pk]
    assert AuditEvent.objects.filter(
        action="batch.decision", details__decision="withdrawn", details__job=third.pk
    ).exists()
    # The running children are left alone.
    assert set(_claimed().values_list("pk", flat=True)) == {first.pk, second.pk}
    # Resumed: the same row is created ahead again, in its place.
    services.do_resume_batch(batch, operator)
    scheduler.tick(batch.pk)
    row.refresh_from_db()
    again = row.job
    assert (
        row.status == BatchItem.STARTED and again.status == MigrationJob.QUEUED and again.vm_id == third.vm_id
    )
    # Cancelled, letting running children finish: the unclaimed one never runs.
    services.do_cancel_batch(batch, operator, cancel_running=False)
    assert runner.run_job(again.pk) is None
    scheduler.tick(batch.pk)
    again.refresh_from_db()
    row.refresh_from_db()
    assert again.status == MigrationJob.CANCELLED and row.status == BatchItem.CANCELLED
    assert set(_claimed().values_list("pk", flat=True)) == {first.pk, second.pk}
    _end(first)
    _end(second)
    scheduler.tick(batch.pk)
    batch.refresh_from_db()
    assert batch.status == Batch.CANCELLED and batch.counts()[BatchItem.SUCCEEDED] == 2
    assert not worker.ran.count(third.pk) and not worker.ran.count(again.pk)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connections["default"].vendor == "sqlite",
    reason="PostgreSQL only (pass 2): SQLite serializes every writer, and the in-memory test "
    "database refuses a locked table at once; under load its retrying threads outlived the test "
    "and left the shared database locked for every later test",
)
def test_it_never_exceeds_a_limit_when_workers_claim_at_once(batch_of, worker, settings):
    """Six children queued, two slots free, six workers claiming at the same instant:
    exactly two get in. On PostgreSQL this needs the claim lock (fleet/limits.py): two
    count subqueries in concurrent UPDATEs of different rows would both see room; the
    test failed there in 5 of 5 runs without the lock."""
    settings.KVMWEB_FLEET_GLOBAL_LIMIT = 6
    batch = batch_of(6, max_parallel=6, per_source=6, per_target=6)
    scheduler.tick(batch.pk)
    children = list(MigrationJob.objects.values_list("pk", flat=True))
    assert len(children) == 6
    Batch.objects.filter(pk=batch.pk).update(per_source=2)
    start, outcomes = threading.Barrier(len(children)), []

    def claim(job_id):
        try:
            start.wait(timeout=60)
            while True:
                try:
                    outcomes.append(runner.run_job(job_id))
                    return
                except OperationalError as exc:
                    # SQLite's in-memory test database is shared-cache: a table lock is
                    # refused at once instead of waited for. Nothing committed: again.
                    if "locked" not in str(exc):
                        raise
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claim, args=(pk,)) for pk in children]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 6
    assert _claimed().count() == 2 and outcomes.count(MigrationJob.PREFLIGHT) <= 2
    held = MigrationJob.objects.filter(status=MigrationJob.QUEUED)
    assert held.count() == 4 and all("Waiting for a free slot" in j.waiting_for for j in held)


def test_it_creates_as_many_ahead_as_the_pipeline_allows_and_starts_them_in_row_order(
    batch_of, worker, settings, monkeypatch
):
    """Two children of a wave often end together: two are created ahead (the default),
    and the worker that frees a slot takes the first row."""
    batch, first, second, *ahead, _sent = _two_running_and_two_ahead(batch_of, settings, monkeypatch)
    scheduler.tick(batch.pk)  # never more than two ahead
    assert MigrationJob.objects.filter(status=MigrationJob.QUEUED).count() == 2
    assert MigrationJob.objects.count() == 4
    assert all("Waiting for a free slot" in job.waiting_for for job in ahead)  # held from creation
    _end(second)
    # The later row's own message, arriving now, does not take the freed slot first.
    assert runner.run_job(ahead[1].pk) is None
    assert windows.successor(second.pk) == ahead[0].pk
    runner.run_job(ahead[0].pk)
    assert windows.successor(second.pk) is None  # full again
    _end(first)
    assert windows.successor(first.pk) == ahead[1].pk


def test_it_releases_children_created_ahead_one_at_a_time_in_row_order(
    batch_of, worker, settings, monkeypatch
):
    """No worker chains them (the slots freed by reconcile, say): the passes release the
    first row first, and the next only once the released one was claimed, so two
    released children never race for one slot."""
    batch, first, second, third, fourth, sent = _two_running_and_two_ahead(batch_of, settings, monkeypatch)
    _end(first)
    _end(second)
    scheduler.tick(batch.pk)
    scheduler.tick(batch.pk)
    assert sent == [third.pk]  # both slots are free; the first row only, for now
    assert runner.run_job(third.pk) == MigrationJob.PREFLIGHT
    scheduler.tick(batch.pk)
    assert sent[:2] == [third.pk, fourth.pk]
    # The pass also created the last row ahead: its own first message is refused (held).
    fifth = MigrationJob.objects.latest("pk")
    assert sent[2:] == [fifth.pk] and runner.run_job(fifth.pk) is None


def test_it_never_hands_a_freed_slot_to_a_child_a_blackout_holds(batch_of, worker):
    from datetime import timedelta

    from django.utils import timezone

    from fleet.models import Blackout
    from hosts.models import Host, HostGroup

    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    group = HostGroup.objects.create(name="maintenance")
    Host.objects.filter(pk=third.target_id).update(group=group)
    now = timezone.now()
    Blackout.objects.create(
        group=group, starts_at=now - timedelta(minutes=1), ends_at=now + timedelta(hours=1), reason="firmware"
    )
    assert runner.run_job(third.pk) is None  # held: no slot, and its target is blacked out
    third.refresh_from_db()
    held_for, lines = third.waiting_for, third.events.count()
    assert held_for
    _end(first)
    # The slot is free, but the blackout still holds the child: the worker that freed the
    # slot gets nothing to run (it would only be refused at its claim), and the child
    # keeps its hold and its log as they were.
    assert windows.successor(first.pk) is None
    third.refresh_from_db()
    assert third.status == MigrationJob.QUEUED and third.waiting_for == held_for
    assert third.events.count() == lines


def test_it_leaves_children_created_ahead_to_their_batch_not_to_the_reconcile_pass(
    batch_of, worker, settings, monkeypatch
):
    """windows.release_due (the default cluster's reconcile pass, every few seconds)
    releases held single jobs; a batch's children created ahead are released by their
    batch (the worker that frees a slot, or the pass), first rows first and one at a time:
    released here, two of them would race for one freed slot in any order."""
    batch, first, second, third, fourth, sent = _two_running_and_two_ahead(batch_of, settings, monkeypatch)
    _end(first)
    assert windows.release_due()["released"] == []
    assert sent == [] and all(
        j.waiting_for for j in MigrationJob.objects.filter(pk__in=[third.pk, fourth.pk])
    )
    # The batch's pass releases the first row.
    scheduler.tick(batch.pk)
    assert sent == [third.pk]


def test_it_starts_no_next_child_after_a_failure_when_the_batch_stops_on_failure(batch_of, worker):
    batch, first, second, third = _two_running_and_one_ahead(batch_of, stop_on_failure=True)
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.QUEUED)  # its message arrives
    worker.ends = {first.pk: MigrationJob.FAILED, third.pk: MigrationJob.SUCCEEDED}
    tasks.run_migration(first.pk)
    # The failure must stop the batch before anything else starts: the worker that ran
    # the failed child does not chain the one created ahead (the pass stops the batch).
    assert third.pk not in worker.ran
    third.refresh_from_db()
    assert third.status == MigrationJob.QUEUED and third.waiting_for
    assert windows.successor(second.pk) is None
    scheduler.tick(batch.pk)
    batch.refresh_from_db()
    third.refresh_from_db()
    assert batch.status == Batch.STOPPING and third.status == MigrationJob.CANCELLED


def test_it_chains_no_next_child_once_its_cluster_is_asked_to_stop(batch_of, worker, monkeypatch):
    from kvmweb import workers

    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.QUEUED)  # its message arrives
    worker.ends = {first.pk: MigrationJob.SUCCEEDED, third.pk: MigrationJob.SUCCEEDED}
    # SIGTERM (a restart) while the first child ran: django-q2 waits for the task to end,
    # so a chained migration would hold the restart for its whole length (or be killed).
    monkeypatch.setattr(workers, "stopping", lambda: True)
    tasks.run_migration(first.pk)
    assert first.pk in worker.ran and third.pk not in worker.ran
    third.refresh_from_db()
    assert third.status == MigrationJob.QUEUED and third.waiting_for  # left to the pass


def test_it_chains_a_child_only_early_enough_in_the_task_to_leave_it_the_task_timeout(
    batch_of, worker, monkeypatch, settings
):
    from types import SimpleNamespace

    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.QUEUED)  # its message arrives
    worker.ends = {first.pk: MigrationJob.SUCCEEDED, third.pk: MigrationJob.SUCCEEDED}
    # django-q2 kills the task at the migration timeout: the first child took 200 s of a
    # 300 s timeout, and a chained child would be killed 100 s into its migration.
    settings.MIGRATION_TIMEOUT = 300
    clock = {"now": 1000.0}
    monkeypatch.setattr(tasks, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    run = worker.run

    def slow(run_):
        clock["now"] += 200
        run(run_)

    monkeypatch.setattr(runner, "_run", slow)
    tasks.run_migration(first.pk)
    assert first.pk in worker.ran and third.pk not in worker.ran


def test_it_rechecks_the_next_child_while_the_one_before_concludes(batch_of, fake_preflight, monkeypatch):
    """The worker that ends a child starts the next child's re-check the moment the VM
    has moved (runner.Lookahead), while it concludes, and then runs that child on it:
    one re-check per child, none waited for between the two."""
    from migrations_app import jobrun, modes

    real_run = runner._run
    monkeypatch.setattr(runner, "_run", lambda run: None)  # the first two: claimed, left so
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    monkeypatch.setattr(runner, "_run", real_run)
    monkeypatch.setattr(runner, "run_preflight", fake_preflight)

    def migrated(mode, run, plan):
        jobrun.conclude_success(run, {"time_elapsed": 900, "downtime": 30, "data_processed": 1 << 20})

    monkeypatch.setattr(type(modes.get("live")), "run", migrated)
    monkeypatch.setattr(runner, "REQUEST_CHECK_SECONDS", 60)  # however slow this machine is
    run_job, given = runner.run_job, {}

    def recording(job_id, **kwargs):
        given[job_id] = kwargs.get("ahead_of_it")
        return run_job(job_id, **kwargs)

    monkeypatch.setattr(runner, "run_job", recording)
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.QUEUED)  # its message arrives
    fake_preflight.calls.clear()
    tasks.run_migration(first.pk)
    assert MigrationJob.objects.get(pk=third.pk).status == MigrationJob.SUCCEEDED
    # The first's re-check at its claim, the third's started while the first concluded
    # and handed to the third's claim.
    ahead = given[third.pk]
    assert given[first.pk] is None and ahead.job_id == third.pk and ahead.checking.done
    assert [vm for vm, _t, _m in fake_preflight.calls] == [first.vm_name, third.vm_name]
    assert JobEvent.objects.filter(job=third, message="Preflight passed again on the worker.").exists()


def test_it_gives_a_look_ahead_only_to_the_child_it_checked_and_only_while_fresh():
    ahead = runner.Lookahead(1, chaining=lambda: False)
    ahead.start()  # the worker will not chain (stopping, out of chain time): nothing runs
    assert ahead.checking is None and ahead.for_job(2) is None
    ahead.job_id, ahead.checking = 2, object()
    ahead.started = time.monotonic() - runner.REQUEST_CHECK_SECONDS - 1
    assert ahead.for_job(2) is None  # the claim came too late: checked again there
    ahead.started = time.monotonic()
    assert ahead.for_job(3) is None and ahead.for_job(2) is ahead.checking


def test_it_frees_a_slot_once_the_child_has_landed_and_leaves_the_release_to_its_worker(
    batch_of, worker, monkeypatch
):
    """A child whose VM has landed (phase "landed", concluding beside the next child's
    start) fills no slot: its worker's successor may claim the held child at once. The
    batch's pass still counts it until it ends: it releases nothing on a landing."""
    from migrations_app import states

    sent = []
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    monkeypatch.setattr("migrations_app.services.enqueue", lambda job: sent.append(job.pk))
    assert runner.run_job(third.pk) is None  # held: ha sends 2
    MigrationJob.objects.filter(pk=first.pk).update(
        status=MigrationJob.RUNNING, phase=states.LANDED, landed_at=timezone.now()
    )
    assert limits.holds(third) == ""
    scheduler.tick(batch.pk)
    third.refresh_from_db()
    assert sent == [] and third.waiting_for  # not released by the pass
    assert windows.successor(first.pk) == third.pk
    assert runner.run_job(third.pk) == MigrationJob.PREFLIGHT
    # Three claimed, two of them migrating: the limit (2 per source) holds.
    assert _claimed().count() == 3 and limits.holding().count() == 2
    assert limits.holding().filter(source_id=first.source_id).count() == 2


def test_it_releases_the_slot_of_a_child_whose_worker_died_after_its_landing(batch_of, worker, monkeypatch):
    """The pass leaves a landing's slot to its worker for LANDED_GRACE only: a worker
    killed after the landing leaves a job that only reconcile ends (maybe much later,
    its target unreachable), and the batch must not wait for that."""
    sent = []
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    monkeypatch.setattr("migrations_app.services.enqueue", lambda job: sent.append(job.pk))
    monkeypatch.setattr(scheduler, "_reconciled_at", {})  # the pass reconciles it: not for later tests
    assert runner.run_job(third.pk) is None  # held: ha sends 2
    landed = timezone.now() - timedelta(seconds=scheduler.LANDED_GRACE + 1)
    MigrationJob.objects.filter(pk=first.pk).update(
        status=MigrationJob.NEEDS_RECONCILE, phase="landed", landed_at=landed, heartbeat_at=landed
    )
    scheduler.tick(batch.pk)
    third.refresh_from_db()
    assert sent == [third.pk] and third.waiting_for == "" and third.status == MigrationJob.QUEUED


def test_it_concludes_a_landed_live_child_beside_the_next_childs_start(batch_of, fake_preflight, monkeypatch):
    """A live child's worker that chains writes "landed" first, then claims the next
    child while the first one's conclusion runs (here at once, in place of its thread:
    what matters is what the row said when it ran); the task waits for every conclusion
    and returns the first job's final status."""
    from migrations_app import jobrun, modes, states

    real_run = runner._run
    monkeypatch.setattr(runner, "_run", lambda run: None)  # the first two: claimed, left so
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    monkeypatch.setattr(runner, "_run", real_run)
    monkeypatch.setattr(runner, "run_preflight", fake_preflight)
    seen, concluding = [], []

    def migrated(mode, run, plan):
        jobrun.conclude_success(
            run, {"time_elapsed": 900, "downtime": 30, "data_processed": 1 << 20}, live=True
        )
        seen.append(MigrationJob.objects.filter(pk=run.job_id).values_list("status", "phase").get())

    class Deferred:
        """Runs the conclusion when the task waits for it (after the next claim)."""

        def __init__(self, fn, name):
            self.fn, self.ran, self.error = fn, False, None
            self.thread = self
            concluding.append(self)

        def join(self):
            if not self.ran:
                self.ran = True
                self.fn()

    monkeypatch.setattr(type(modes.get("live")), "run", migrated)
    monkeypatch.setattr(jobrun, "Operation", Deferred)
    # Run on this thread, the conclusion must not close the test's own connection.
    monkeypatch.setattr(jobrun.connections, "close_all", lambda: None)
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.QUEUED)  # its message arrives
    assert tasks.run_migration(first.pk) == MigrationJob.SUCCEEDED
    # Each ran its migration and landed; the first's conclusion had not run when the
    # third was claimed (its slot was free from the landing).
    assert seen == [(MigrationJob.RUNNING, states.LANDED)] * 2
    assert len(concluding) == 2 and all(c.ran for c in concluding)
    for job in (first, third):
        job.refresh_from_db()
        assert job.status == MigrationJob.SUCCEEDED and job.phase == "done"
        assert job.started_at < job.landed_at <= job.finished_at
    third.refresh_from_db()
    assert third.started_at >= first.landed_at  # claimed once the first had landed
    assert AuditEvent.objects.filter(action="migration.finish", outcome=AuditEvent.SUCCESS).count() == 2


def test_it_gives_two_workers_whose_children_landed_together_two_different_successors(
    batch_of, worker, settings, monkeypatch
):
    """Both children of a wave land at once and both workers ask for a successor: the
    first one released is the first worker's, the second worker gets the next one
    (asking again for the same child, its claim would be refused)."""
    batch, first, second, third, fourth, _sent = _two_running_and_two_ahead(batch_of, settings, monkeypatch)
    now = timezone.now()
    MigrationJob.objects.filter(pk__in=[first.pk, second.pk]).update(
        status=MigrationJob.RUNNING, phase="landed", landed_at=now
    )
    assert limits.upcoming(second.pk) == third.pk  # both held: the first in row order
    assert windows.successor(first.pk) == third.pk
    assert limits.upcoming(second.pk) == fourth.pk  # the third is the first worker's now
    assert windows.successor(second.pk) == fourth.pk
    assert runner.run_job(fourth.pk) == MigrationJob.PREFLIGHT
    assert runner.run_job(third.pk) == MigrationJob.PREFLIGHT
    assert limits.holding().count() == 2


def test_it_holds_a_landed_childs_conclusion_until_the_next_childs_migration_starts(monkeypatch):
    """The landed child's conclusion (its writes and CPU) waits in its thread until the
    next child's migration call started (Lookahead.next_moving, called by the live mode at
    its migrate call and by the task once that child ended or was not claimed), and at
    most CONCLUDE_AFTER_SECONDS when nothing says so."""
    from types import SimpleNamespace

    from migrations_app import jobrun

    concluded = []
    monkeypatch.setattr(jobrun, "_conclude_success", lambda run, *a, **k: concluded.append(run.job_id))
    monkeypatch.setattr(jobrun.connections, "close_all", lambda: None)
    ahead = runner.Lookahead(1)
    beats = []
    run = SimpleNamespace(job_id=1, lookahead=ahead, heartbeat=lambda: beats.append(1))
    op = jobrun.Operation(lambda: jobrun._conclude_in_thread(run, {}, {}), "conclude")
    assert not op.wait(0.3) and concluded == []  # the next child is still on its way
    ahead.next_moving()
    assert op.wait(30) and concluded == [1] and beats == [1]  # a heartbeat before it goes on

    monkeypatch.setattr(jobrun, "CONCLUDE_AFTER_SECONDS", 0.05)
    run = SimpleNamespace(job_id=2, lookahead=runner.Lookahead(2), heartbeat=lambda: None)
    op = jobrun.Operation(lambda: jobrun._conclude_in_thread(run, {}, {}), "conclude")
    assert op.wait(30) and concluded == [1, 2]  # nobody said so: it goes on after the bound


def test_it_checks_again_only_what_a_landing_changes_for_a_child_bound_to_the_same_target(
    batch_of, monkeypatch
):
    """The next child bound to the host a VM is landing on is re-checked in the
    migration's last second like any other; once the VM has landed, only what the
    landing changes there (free memory, names: runner.AFTER_LANDING) runs again, the rest
    is taken from that early re-check, and that result is the one the claim is offered
    (Lookahead.for_job). One whose VM never landed is not offered."""
    from migrations_app.preflight import CheckResult, Report

    real_run = runner._run
    monkeypatch.setattr(runner, "_run", lambda run: None)  # the first two: claimed, left so
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    monkeypatch.setattr(runner, "_run", real_run)
    MigrationJob.objects.filter(pk=third.pk).update(target=first.target, target_name=first.target_name)
    ran = []

    def preflight(plan, **kwargs):
        reused = kwargs.get("reuse") or {}
        ran.append(sorted(set(("memory", "collision", "vm_state", "storage")) - set(reused)))
        results = [
            reused.get(cid) or CheckResult(cid, cid, "pass", f"checked {len(ran)}")
            for cid in ("memory", "collision", "vm_state", "storage")
        ]
        return Report(results=results, verdict="pass", started_at="2026-12-07T21:00:00+00:00", duration_ms=1)

    monkeypatch.setattr(runner, "run_preflight", preflight)
    monkeypatch.setattr(runner, "REQUEST_CHECK_SECONDS", 60)  # however slow this machine is
    ahead = runner.Lookahead(first.pk)
    ahead.start(before_landing=first.target_id)  # the live monitor, ETA under a second
    assert ahead.job_id == third.pk and ahead.checking.wait(30)
    early = ahead.checking
    ahead.start()  # the VM has landed (jobrun.conclude_success)
    assert ahead.checking is not early and ahead.checking.wait(30) and ahead.checking.error is None
    assert ran == [["collision", "memory", "storage", "vm_state"], ["collision", "memory"]]
    again = ahead.checking.value
    assert {r.id: r.message for r in again.results} == {
        "memory": "checked 2",
        "collision": "checked 2",
        "vm_state": "checked 1",
        "storage": "checked 1",
    }
    assert again.reused_from == "2026-12-07T21:00:00+00:00"  # as old as the early one
    assert ahead.for_job(third.pk) is ahead.checking
    ahead.start()  # asked again (another landing pass): nothing more runs
    assert len(ran) == 2

    # The VM never landed (its migration failed): the early re-check is not offered,
    # the claim checks again.
    failed = runner.Lookahead(first.pk)
    failed.start(before_landing=first.target_id)
    assert failed.checking.wait(30) and failed.for_job(third.pk) is None

    # A child bound elsewhere: the early re-check stands as it is.
    assert second.target_id != first.target_id
    MigrationJob.objects.filter(pk=third.pk).update(target=second.target, target_name=second.target_name)
    other = runner.Lookahead(first.pk)
    other.start(before_landing=first.target_id)
    assert other.checking.wait(30)
    early = other.checking
    other.start()
    assert other.checking is early and len(ran) == 4 and other.for_job(third.pk) is early


def test_it_lets_a_landed_childs_conclusion_go_on_once_its_successor_is_past_its_start(monkeypatch):
    """The task tells a child's Lookahead as soon as the successor it ran there returned
    (claimed and ended, or not claimed at all), so no conclusion waits out
    CONCLUDE_AFTER_SECONDS for a start that will not come; each is told again before the
    task waits for the conclusions."""
    seen = []

    class Spy(runner.Lookahead):
        def next_moving(self):
            seen.append(("moving", self.after))
            super().next_moving()

    def run_job(job_id, **kwargs):
        seen.append(("run", job_id))
        return None if job_id == 3 else MigrationJob.SUCCEEDED  # 3: another worker claimed it

    successors = iter([2, 3, 4, None])
    monkeypatch.setattr(runner, "Lookahead", Spy)
    monkeypatch.setattr(runner, "run_job", run_job)
    monkeypatch.setattr(tasks.windows, "successor", lambda job_id: next(successors))
    monkeypatch.setattr(tasks.windows, "chains", lambda job_id: True)
    tasks.run_migration(1)
    assert seen[:6] == [("run", 1), ("run", 2), ("moving", 1), ("run", 3), ("moving", 2), ("run", 4)]
    # 3 was not run here: 4 follows nobody's conclusion. At the end every one is told.
    assert seen[6:] == [("moving", 1), ("moving", 2), ("moving", 3), ("moving", 4)]


def test_it_guesses_each_running_child_its_own_next_child_by_their_start_order(
    batch_of, settings, monkeypatch
):
    """Two children running: the first started is guessed the first held child, the
    second the next one (both guessing the first, one early re-check ran twice and the
    other worker checked its own only after its landing). Once the first landed and its
    worker took the third, the second's guess stays the fourth; with fewer held children
    than running ones, the last held child is the guess."""
    batch, first, second, third, fourth, _sent = _two_running_and_two_ahead(batch_of, settings, monkeypatch)
    now = timezone.now()
    running = {"status": MigrationJob.RUNNING, "landed_at": None}
    MigrationJob.objects.filter(pk=first.pk).update(started_at=now - timedelta(seconds=2), **running)
    MigrationJob.objects.filter(pk=second.pk).update(started_at=now - timedelta(seconds=1), **running)
    BatchItem.objects.filter(job__in=[first, second]).update(status=BatchItem.STARTED)
    MigrationJob.objects.filter(pk__in=[third.pk, fourth.pk]).update(
        waiting_for="Created ahead of a free slot"
    )
    assert limits.upcoming(first.pk) == third.pk
    assert limits.upcoming(second.pk) == fourth.pk
    MigrationJob.objects.filter(pk=first.pk).update(phase="landed", landed_at=now)
    assert windows.successor(first.pk) == third.pk
    assert limits.upcoming(second.pk) == fourth.pk
    MigrationJob.objects.filter(pk=first.pk).update(landed_at=None)  # as if still running
    assert limits.upcoming(second.pk) == fourth.pk  # place 1, one held child left: that one
    # Landed before the first (a smaller VM): its worker asks for a successor now and
    # gets the first held child, whatever its place.
    MigrationJob.objects.filter(pk=third.pk).update(waiting_for="Created ahead of a free slot")
    MigrationJob.objects.filter(pk=second.pk).update(phase="landed", landed_at=now)
    assert limits.upcoming(second.pk) == third.pk


def test_it_starts_the_early_recheck_once_when_the_second_pass_begins(monkeypatch):
    """libvirt's migration-pass event starts the next child's early re-check from a thread
    of its own, once: not for the first pass, not again for the third, not when the ETA
    asked first (Lookahead.early)."""
    from types import SimpleNamespace

    from migrations_app.modes import live

    class Monitor:
        def watch_migration_passes(self, uuid, callback, timeout=None):
            self.callback = callback
            return 7

    ahead = runner.Lookahead(1)
    started = []
    done = threading.Event()

    def start_early(target_id):
        started.append((target_id, threading.current_thread().name))
        done.set()

    monkeypatch.setattr(ahead, "start_early", start_early)
    run = SimpleNamespace(lookahead=ahead, job=SimpleNamespace(target_id=5), job_id=1)
    mon = Monitor()
    assert live.watch_passes(run, mon, "uuid") == 7
    mon.callback(1)
    assert not started and not ahead.tried_early
    mon.callback(2)
    assert done.wait(10)
    assert not ahead.early()  # the monitor's ETA comes second: nothing more
    # Later passes start nothing, even once that re-check is old (a guest that never
    # converges passes on and on); the ETA in the last second still may.
    monkeypatch.setattr(runner, "REQUEST_CHECK_SECONDS", 0.0)
    mon.callback(3)
    mon.callback(2)
    assert started == [(5, "lookahead after 1")]
    assert ahead.early()
    # Without a chaining worker nothing is watched.
    assert live.watch_passes(SimpleNamespace(lookahead=None), mon, "uuid") is None


def test_it_asks_for_a_fresh_early_recheck_once_the_last_one_would_be_too_old(monkeypatch):
    """A big guest's second pass may begin long before its landing: once the early
    re-check is older than the landing would take (REQUEST_CHECK_SECONDS / 2), the ETA in
    its last second gets a yes again."""
    ahead = runner.Lookahead(1)
    assert ahead.early() and not ahead.early()
    monkeypatch.setattr(runner, "REQUEST_CHECK_SECONDS", 0.0)  # every yes is old at once
    assert ahead.early() and ahead.tried_early


def test_it_says_yes_to_exactly_one_of_many_threads_asking_for_the_early_recheck():
    ahead = runner.Lookahead(1)
    answers, gate = [], threading.Barrier(8)

    def ask():
        gate.wait()
        answers.append(ahead.early())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [False] * 7 + [True]


def test_it_leaves_the_limits_out_of_a_single_jobs_claim_and_keeps_them_in_a_childs(
    batch_of, worker, monkeypatch
):
    """A job without a batch item can never get one (the scheduler links a child in the
    transaction that creates it): its claim's UPDATE leaves the limits' subqueries out.
    A child's keeps them: its claim is still refused while its source's slots are full."""
    batch, first, second, third = _two_running_and_one_ahead(batch_of)
    free_vm = VM.objects.exclude(pk__in=MigrationJob.objects.values("vm_id")).first()  # the 4th row's
    single = MigrationJob.objects.create(
        vm=free_vm,
        vm_name=free_vm.name,
        source=third.source,
        source_name=third.source_name,
        target=third.target,
        target_name=third.target_name,
        mode="live",
        status=MigrationJob.QUEUED,
    )
    real_room, asked = limits.room, []
    monkeypatch.setattr(limits, "room", lambda: asked.append(1) or real_room())
    windows.claim_condition(timezone.now(), single.pk)
    assert asked == []
    windows.claim_condition(timezone.now(), third.pk)
    windows.claim_condition(timezone.now())
    assert asked == [1, 1]
    monkeypatch.setattr(runner, "_run", lambda run: None)
    assert runner.run_job(third.pk) is None  # ha sends 2 already: held
    assert runner.run_job(single.pk) == MigrationJob.PREFLIGHT  # a single job is never held by them
    assert limits.is_child(third.pk) and not limits.is_child(single.pk)

"""Batches: children created within the limits and linked to their items in the same
transaction, followed to the end, pause/resume/cancel, stop on first failure, the
scheduler's lease, crash safety of a pass, audit events and the pages."""

import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from fleet import scheduler, services
from fleet.models import Batch, BatchItem, Blackout
from fleet.planner import make_plan
from hosts.models import VM, Host, HostGroup
from kvmweb.audit.models import AuditEvent
from migrations_app.models import JobEvent, MigrationJob


@pytest.fixture(autouse=True)
def _no_children_ahead(settings):
    """These tests follow the scheduler's starts within the limits, with workers that end
    queued children at once; children created ahead of a free slot (which wait at the
    worker's claim) are tests/fleet/test_pipeline.py's."""
    settings.KVMWEB_FLEET_PIPELINE = 0


def _finish_children(status=MigrationJob.SUCCEEDED):
    """What the workers would do: the active children end (moving the VM on success)."""
    for job in MigrationJob.objects.filter(status=MigrationJob.QUEUED):
        MigrationJob.objects.filter(pk=job.pk).update(status=status)
        if status == MigrationJob.SUCCEEDED:
            VM.objects.filter(pk=job.vm_id).update(host=job.target)


def _active_by_source():
    return MigrationJob.objects.filter(status__in=MigrationJob.ACTIVE_STATES, source__name="ha").count()


def test_it_starts_children_within_the_limits_and_finishes(batch_of):
    batch = batch_of(5, per_source=2, per_target=2, max_parallel=4)
    assert batch.status == Batch.RUNNING
    seen_max = 0
    for _ in range(10):
        scheduler.tick(batch.pk)
        seen_max = max(seen_max, _active_by_source())
        if Batch.objects.get(pk=batch.pk).is_final:
            break
        _finish_children()
    batch.refresh_from_db()
    assert batch.status == Batch.SUCCEEDED and seen_max == 2
    items = list(batch.items.select_related("job"))
    assert all(i.status == BatchItem.SUCCEEDED and i.job.vm_id == i.vm_id for i in items)
    assert MigrationJob.objects.count() == 5  # each VM exactly once
    actions = list(
        AuditEvent.objects.filter(action__startswith="batch.").order_by("id").values_list("action", flat=True)
    )
    assert actions[:2] == ["batch.plan", "batch.start"] and actions[-1] == "batch.end"
    assert actions.count("batch.decision") == 5


def test_it_counts_jobs_outside_the_batch_against_the_source_limit(batch_of, fleet, make_vm, operator):
    batch = batch_of(3, per_source=2)
    other = make_vm("outsider")
    MigrationJob.objects.create(
        vm=other,
        vm_name="outsider",
        source=fleet["ha"],
        source_name="ha",
        target=fleet["hb"],
        target_name="hb",
        mode="live",
    )
    scheduler.tick(batch.pk)
    assert batch.items.filter(status=BatchItem.STARTED).count() == 1


def test_it_pauses_resumes_and_cancels(batch_of, operator):
    batch = batch_of(4, per_source=1)
    services.do_pause_batch(batch, operator)
    scheduler.tick(batch.pk)
    assert not MigrationJob.objects.exists()
    services.do_resume_batch(batch, operator)
    scheduler.tick(batch.pk)
    assert MigrationJob.objects.count() == 1
    services.do_cancel_batch(batch, operator, cancel_running=True)
    scheduler.tick(batch.pk)
    assert MigrationJob.objects.get().status == MigrationJob.CANCELLED  # it had not started
    scheduler.tick(batch.pk)
    batch.refresh_from_db()
    assert batch.status == Batch.CANCELLED
    assert batch.items.filter(status=BatchItem.CANCELLED).count() == 4
    with pytest.raises(services.BatchError):
        services.do_resume_batch(batch, operator)
    assert AuditEvent.objects.filter(action="batch.resume", outcome=AuditEvent.DENIED).exists()


def test_it_goes_on_after_a_failure_unless_told_to_stop(batch_of):
    batch = batch_of(3, per_source=1)
    scheduler.tick(batch.pk)
    _finish_children(MigrationJob.FAILED)
    for _ in range(5):
        scheduler.tick(batch.pk)
        _finish_children()
    batch.refresh_from_db()
    assert batch.status == Batch.FAILED  # finished, with one failure
    assert batch.counts()[BatchItem.SUCCEEDED] == 2 and batch.counts()[BatchItem.FAILED] == 1


def test_it_stops_on_the_first_failure_when_asked(batch_of):
    batch = batch_of(3, per_source=1, stop_on_failure=True)
    scheduler.tick(batch.pk)
    _finish_children(MigrationJob.FAILED)
    scheduler.tick(batch.pk)
    batch.refresh_from_db()
    assert batch.status == Batch.FAILED and MigrationJob.objects.count() == 1
    assert batch.counts()[BatchItem.SKIPPED] == 2


def test_it_lets_one_scheduler_pass_at_a_time(batch_of):
    batch = batch_of(2)
    assert scheduler.claim(batch.pk, "other-process")
    assert scheduler.tick(batch.pk) is None  # the lease is held: nothing done
    assert not MigrationJob.objects.exists()
    scheduler.release(batch.pk, "other-process")
    assert scheduler.tick(batch.pk) == Batch.RUNNING


def test_it_never_loses_or_doubles_a_child_when_a_pass_dies_mid_creation(batch_of, monkeypatch):
    batch = batch_of(1)

    def die(*args, **kwargs):
        raise SystemExit("killed between creating the job and linking it")

    # The job row is created, then the pass dies before the item is linked: the whole
    # transaction rolls back, so neither exists.
    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(BatchItem.objects, "filter", _dying_after_job(BatchItem.objects.filter, die))
        with transaction.atomic():
            scheduler.tick(batch.pk)
    assert not MigrationJob.objects.exists()
    item = batch.items.get()
    assert item.status == BatchItem.PENDING and item.job is None
    scheduler.tick(batch.pk)
    scheduler.tick(batch.pk)
    item.refresh_from_db()
    assert item.status == BatchItem.STARTED and MigrationJob.objects.get() == item.job


def _dying_after_job(original, die):
    def filter(*args, **kwargs):
        qs = original(*args, **kwargs)
        if kwargs.get("pk") and MigrationJob.objects.exists():
            die()
        return qs

    return filter


def test_it_retries_once_a_child_lost_with_its_worker_before_libvirt_moved_anything(batch_of):
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    first = MigrationJob.objects.get()
    # What reconcile concludes after the worker died before the migration: failed, VM on
    # the source.
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.FAILED, worker="reconcile:w1")
    scheduler.tick(batch.pk)
    item = batch.items.get()
    assert item.status == BatchItem.STARTED and item.attempts == 1 and item.previous_jobs == [first.pk]
    second = item.job
    assert second != first and MigrationJob.objects.count() == 2
    assert AuditEvent.objects.filter(action="batch.decision", details__decision="retry").count() == 1
    # A second loss is not retried again, and an ordinary failure never is.
    MigrationJob.objects.filter(pk=second.pk).update(status=MigrationJob.FAILED, worker="reconcile:w2")
    scheduler.tick(batch.pk)
    item.refresh_from_db()
    assert item.status == BatchItem.FAILED and MigrationJob.objects.count() == 2


def _one_child_messages_recorded(batch_of, monkeypatch):
    """A batch of one whose child the first pass created; every message sent for a job
    (first or again) is recorded instead."""
    sent = []
    monkeypatch.setattr("migrations_app.services.enqueue", lambda job: sent.append(job.pk))
    monkeypatch.setattr("migrations_app.reconcile.enqueue", lambda job: sent.append(job.pk))
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    return batch, MigrationJob.objects.get(), sent


def test_it_queues_again_a_child_whose_message_was_lost(batch_of, monkeypatch, settings):
    """The scheduler was killed between the child's commit and its on-commit message (or
    the migrations cluster died holding the message): no reconcile pass runs, yet the
    batch's own passes queue the child again, once per interval, until a worker claims it."""
    settings.KVMWEB_FLEET_CHILD_REQUEUE_SECONDS = 15
    batch, job, sent = _one_child_messages_recorded(batch_of, monkeypatch)
    assert sent == [job.pk]  # the first message, lost
    scheduler.tick(batch.pk)
    assert sent == [job.pk]  # a fresh child waits for its worker
    queued_at = job.created_at - timedelta(seconds=16)
    MigrationJob.objects.filter(pk=job.pk).update(created_at=queued_at)
    JobEvent.objects.filter(job=job).update(at=queued_at)  # its "Requested ...; queued." line too
    scheduler.tick(batch.pk)
    assert sent == [job.pk, job.pk]
    assert JobEvent.objects.filter(job=job, message__startswith="Queued again").count() == 1
    scheduler.tick(batch.pk)
    assert len(sent) == 2  # not again before another interval
    # A child held at its claim by a blackout has no message on purpose: left alone while
    # the blackout lasts, released by the batch's pass when it is over (no reconcile pass
    # runs here either).
    group = HostGroup.objects.create(name="rack-a")
    Host.objects.filter(pk=job.source_id).update(group=group)
    blackout = Blackout.objects.create(
        group=group,
        starts_at=timezone.now() - timedelta(minutes=1),
        ends_at=timezone.now() + timedelta(hours=1),
    )
    JobEvent.objects.filter(job=job).update(at=queued_at)
    MigrationJob.objects.filter(pk=job.pk).update(waiting_for="Blackout of rack-a until later.")
    scheduler.tick(batch.pk)
    assert len(sent) == 2
    blackout.delete()
    scheduler.tick(batch.pk)
    job.refresh_from_db()
    assert len(sent) == 3 and job.waiting_for == "" and job.status == MigrationJob.QUEUED


def test_it_does_not_queue_again_a_child_waiting_behind_other_messages(batch_of, monkeypatch):
    """Fewer workers than the limits allow: the child's message waits in the migrations
    queue behind others. Re-sending it every interval would only add duplicates behind
    them; it is re-sent once the queue drained and it is still unclaimed."""
    from django_q.models import OrmQ

    batch, job, sent = _one_child_messages_recorded(batch_of, monkeypatch)
    queued_at = job.created_at - timedelta(seconds=60)
    MigrationJob.objects.filter(pk=job.pk).update(created_at=queued_at)
    JobEvent.objects.filter(job=job).update(at=queued_at)
    waiting = OrmQ.objects.create(key="migrations", payload="another job's message", lock=timezone.now())
    scheduler.tick(batch.pk)
    assert sent == [job.pk]  # only the first message
    waiting.delete()  # a worker took it; this child is still unclaimed
    scheduler.tick(batch.pk)
    assert sent == [job.pk, job.pk]


def test_it_reconciles_a_child_whose_worker_died_after_the_last_reconcile(batch_of, monkeypatch):
    """The child's worker died and no reconcile pass runs (the default cluster is down):
    the batch's pass concludes it from libvirt (VM still on its source, no libvirt job)
    and retries it, instead of waiting for it forever."""
    monkeypatch.setattr(
        "migrations_app.modes.live.where_is", lambda job: {"source": ("running", 1), "target": None}
    )
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    first = MigrationJob.objects.get()
    MigrationJob.objects.filter(pk=first.pk).update(
        status=MigrationJob.RUNNING, worker="w1", heartbeat_at=timezone.now() - timedelta(seconds=5)
    )
    scheduler.tick(batch.pk)
    first.refresh_from_db()
    assert first.status == MigrationJob.RUNNING  # heartbeat recent enough: its worker may be alive
    MigrationJob.objects.filter(pk=first.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=60))
    scheduler.tick(batch.pk)
    first.refresh_from_db()
    assert first.status == MigrationJob.FAILED and first.worker.startswith("reconcile:")
    assert "did not complete the migration" in first.error
    scheduler.tick(batch.pk)  # the next pass follows it: lost with its worker, retried
    item = batch.items.get()
    assert item.status == BatchItem.STARTED and item.previous_jobs == [first.pk] and item.job != first


def test_it_starts_the_next_child_before_following_the_one_that_ended(batch_of):
    """A freed slot is used first in a pass: the ended child's item end (a transaction and
    an audit line) is written after the next child exists, off its critical path. Not
    with "stop on first failure", where the ended child decides whether anything starts."""
    batch = batch_of(3, per_source=1)
    scheduler.tick(batch.pk)
    first = MigrationJob.objects.get()
    MigrationJob.objects.filter(pk=first.pk).update(status=MigrationJob.SUCCEEDED)
    scheduler.tick(batch.pk)
    assert MigrationJob.objects.count() == 2 and _active_by_source() == 1
    events = AuditEvent.objects.filter(action__in=["batch.decision", "batch.item_end"]).order_by("id")
    assert [(e.action, e.details["job"]) for e in events] == [
        ("batch.decision", first.pk),
        ("batch.decision", first.pk + 1),
        ("batch.item_end", first.pk),
    ]
    assert batch.items.get(job=first).status == BatchItem.SUCCEEDED


def test_it_reacts_at_once_when_a_child_ends(batch_of):
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    assert not scheduler.child_ended(batch.pk) and not scheduler.child_ended()
    t0 = time.monotonic()
    assert scheduler.wait_for_work(batch.pk, 0.2) is False  # nothing ended: waited it out
    assert time.monotonic() - t0 >= 0.2
    MigrationJob.objects.update(status=MigrationJob.SUCCEEDED)
    assert scheduler.child_ended(batch.pk) and scheduler.child_ended()
    t0 = time.monotonic()
    assert scheduler.wait_for_work(batch.pk, 60) is False
    assert time.monotonic() - t0 < 30  # returned on the ended child, not after a minute
    assert scheduler.wait_for_work(None, 60, stop=lambda seconds: True) is True  # worker stops


@pytest.mark.skipif(
    connection.vendor != "sqlite", reason="SQLite only: on PostgreSQL the watcher polls (workers elsewhere)"
)
def test_it_is_woken_when_a_job_ends_instead_of_polling(
    batch_of, settings, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    """On SQLite every worker is on this machine: a job's final state sends the batch's
    watcher a wake-up (migrations_app/lifecycle.py ENDED), so it asks the database only
    every WOKEN_POLL_SECONDS (here a minute) and still returns at once."""
    import threading

    from kvmweb import qbroker
    from migrations_app.lifecycle import ENDED, transition

    settings.DATA_DIR = tmp_path
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    job = MigrationJob.objects.get()
    listener = qbroker.Listener(ENDED)  # this process's, as wait_for_work's below
    listener.wait(0)  # nothing left from an earlier test
    with django_capture_on_commit_callbacks(execute=True):
        assert transition(job.pk, MigrationJob.PREFLIGHT, from_=[MigrationJob.QUEUED])
    assert listener.wait(0) is False  # not for a state that is not final
    with django_capture_on_commit_callbacks(execute=True):
        assert transition(job.pk, MigrationJob.FAILED, error="test")
    assert listener.wait(10) is True and listener.wait(0) is False

    monkeypatch.setattr(scheduler, "WOKEN_POLL_SECONDS", 60)
    ended, asked = [False], []

    def child_ended(batch_id=None):
        answer = ended[0]  # read first: set between the two lines, it must wait for the wake-up
        asked.append(answer)
        return answer

    monkeypatch.setattr(scheduler, "child_ended", child_ended)
    got = {}
    waiting = threading.Thread(target=lambda: got.update(r=scheduler.wait_for_work(batch.pk, 120)))
    waiting.start()
    time.sleep(0.2)  # waiting (nothing has ended: it waits for a wake-up or a minute)
    assert waiting.is_alive() and asked == []
    ended[0] = True
    t0 = time.monotonic()
    assert qbroker.wake(ENDED) == 1
    waiting.join(60)
    assert got == {"r": False} and time.monotonic() - t0 < 30  # woken, not after a minute
    assert asked == [True]  # asked once, on the wake-up: no polling before it


def test_it_does_not_retry_a_child_rolled_back_after_a_side_effect(batch_of):
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    # A cold child whose worker died after the shutdown: reconcile rolled it back (the VM
    # runs on the source again). Retrying would shut the VM down a second time.
    journal = [{"step": "begin", "state": "done"}, {"step": "shutdown", "state": "started"}]
    MigrationJob.objects.update(status=MigrationJob.FAILED, worker="reconcile:w1", journal=journal)
    scheduler.tick(batch.pk)
    assert batch.items.get().status == BatchItem.FAILED and MigrationJob.objects.count() == 1


def test_it_does_not_retry_a_child_that_failed_on_its_own(batch_of):
    batch = batch_of(1)
    scheduler.tick(batch.pk)
    MigrationJob.objects.update(status=MigrationJob.FAILED, worker="host:123")
    scheduler.tick(batch.pk)
    assert batch.items.get().status == BatchItem.FAILED and MigrationJob.objects.count() == 1


def test_it_refuses_batches_to_self_service_users(fleet, make_vm, alice, fake_preflight):
    make_vm("web1")
    with pytest.raises(services.BatchError):
        services.plan_evacuation(fleet["ha"], alice)
    assert AuditEvent.objects.filter(action="batch.plan", outcome=AuditEvent.DENIED, actor=alice).exists()


def test_it_moves_back_to_the_recorded_origins(batch_of, fleet, operator):
    batch = batch_of(2)
    for _ in range(4):
        scheduler.tick(batch.pk)
        _finish_children()
    batch.refresh_from_db()
    assert batch.status == Batch.SUCCEEDED
    fleet["ha"].maintenance = True
    fleet["ha"].save()
    with pytest.raises(services.BatchError, match="maintenance"):
        services.do_move_back(batch, operator)
    fleet["ha"].maintenance = False
    fleet["ha"].save()
    back = services.do_move_back(batch, operator, measure_dirty_rate=False)
    assert back.kind == Batch.MOVE_BACK and back.parent == batch
    assert {(i.vm_name, i.target_name, i.status) for i in back.items.all()} == {
        ("vm0", "ha", BatchItem.PENDING),
        ("vm1", "ha", BatchItem.PENDING),
    }


def test_it_plans_and_starts_from_the_pages(fleet, make_vm, operator, login, fake_preflight):
    make_vm("web1")
    client = login(operator)
    page = client.post(f"/fleet/hosts/{fleet['ha'].pk}/evacuate/", {"action": "check", "max_parallel": "3"})
    assert (
        page.status_code == 200
        and "web1" in page.content.decode()
        and "Predicted total" in page.content.decode()
    )
    response = client.post(
        f"/fleet/hosts/{fleet['ha'].pk}/evacuate/", {"action": "start", "max_parallel": "3"}
    )
    batch = Batch.objects.get()
    assert response.status_code == 302 and batch.max_parallel == 3 and batch.status == Batch.RUNNING
    live = client.get(f"/fleet/batches/{batch.pk}/live/").content.decode()
    assert "web1" in live and "0 of 1 done" in live
    # Bulk: the same planner for selected VMs.
    other = make_vm("db1")
    page = client.post("/fleet/bulk/", {"vm": [other.pk], "action": "check"})
    assert "db1" in page.content.decode()


def test_it_waits_for_the_window_and_marks_what_missed_it(fleet, make_vm, operator, fake_preflight, login):
    from datetime import timedelta

    from django.utils import timezone

    make_vm("web1")
    make_vm("web2")
    plan = make_plan(VM.objects.filter(host=fleet["ha"]), operator, measure_dirty_rate=False)
    soon = timezone.now() + timedelta(hours=1)
    batch = services.do_create_batch(plan, operator, host=fleet["ha"], not_before=soon)
    scheduler.tick(batch.pk)
    assert not MigrationJob.objects.exists()  # not before its window
    assert "Starts in" in login(operator).get(f"/fleet/batches/{batch.pk}/live/").content.decode()
    # The window opens, one child starts; then it closes before the second could.
    Batch.objects.filter(pk=batch.pk).update(
        not_before=timezone.now() - timedelta(minutes=1),
        not_after=timezone.now() + timedelta(minutes=1),
        per_source=1,
    )
    scheduler.tick(batch.pk)
    assert MigrationJob.objects.count() == 1
    Batch.objects.filter(pk=batch.pk).update(not_after=timezone.now() - timedelta(seconds=1))
    _finish_children()
    scheduler.tick(batch.pk)
    batch.refresh_from_db()
    assert batch.status == Batch.FAILED and MigrationJob.objects.count() == 1
    assert batch.counts()[BatchItem.MISSED] == 1 and batch.counts()[BatchItem.SUCCEEDED] == 1
    with pytest.raises(services.BatchError, match="window"):
        services.do_create_batch(plan, operator, not_before=soon, not_after=soon - timedelta(minutes=5))


def test_it_reuses_a_recent_plan_report_and_checks_again_when_it_is_old(
    fleet, make_vm, operator, fake_preflight, settings
):
    from datetime import UTC, datetime, timedelta

    from tests.fleet.conftest import prediction, report

    def fresh(plan):
        r = report(prediction())
        r.started_at = datetime.now(UTC).isoformat()
        return r

    for name in ("web1", "web2"):
        make_vm(name)
        fake_preflight.answers[name] = fresh
    plan = make_plan(VM.objects.filter(host=fleet["ha"]), operator, measure_dirty_rate=False)
    batch = services.do_create_batch(plan, operator, host=fleet["ha"])
    planned = len(fake_preflight.calls)
    web2 = BatchItem.objects.get(vm__name="web2")
    web2.report["started_at"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    web2.save()
    scheduler.tick(batch.pk)
    assert MigrationJob.objects.count() == 2
    # web1's plan-time report was recent: no second checklist; web2's was an hour old.
    assert [c[0] for c in fake_preflight.calls[planned:]] == ["web2"]
    web1 = BatchItem.objects.get(vm__name="web1")
    assert web1.job.preflight["started_at"] == web1.report["started_at"]


def test_it_is_driven_by_the_periodic_task(batch_of):
    from fleet.tasks import batch_watch

    batch = batch_of(3, per_source=2)
    batch_watch(duration=0.0, every=0.0)  # one pass over every active batch
    assert batch.items.filter(status=BatchItem.STARTED).count() == 2


def test_it_waits_out_a_blackout_unless_an_administrator_overrides_it(
    fleet, make_vm, operator, admin, fake_preflight, login, capsys
):
    from datetime import timedelta

    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.utils import timezone

    from fleet.models import Blackout
    from hosts.models import HostGroup

    group = HostGroup.objects.create(name="rack-b")
    fleet["hb"].group = group
    fleet["hb"].save()
    start = timezone.now() - timedelta(minutes=5)
    with pytest.raises(CommandError):  # operators may not set blackouts
        call_command(
            "blackout",
            "rack-b",
            start.isoformat(),
            (start + timedelta(hours=1)).isoformat(),
            "--user",
            "operator",
        )
    call_command(
        "blackout",
        "rack-b",
        start.isoformat(),
        (start + timedelta(hours=1)).isoformat(),
        "--reason",
        "UPS work",
        "--user",
        "admin",
    )
    assert Blackout.objects.get().reason == "UPS work"
    assert AuditEvent.objects.filter(
        action="blackout.create", outcome=AuditEvent.SUCCESS, actor=admin
    ).exists()
    make_vm("web1")
    overrides = {VM.objects.get(name="web1").pk: {"target": fleet["hb"].pk}}
    plan = make_plan(
        VM.objects.filter(host=fleet["ha"]), operator, overrides=overrides, measure_dirty_rate=False
    )
    batch = services.do_create_batch(plan, operator, host=fleet["ha"])
    scheduler.tick(batch.pk)
    batch.refresh_from_db()
    assert not MigrationJob.objects.exists() and "Blackout of rack-b" in batch.waiting_for
    assert "UPS work" in login(operator).get(f"/fleet/batches/{batch.pk}/live/").content.decode()
    # Only an administrator may start a batch that ignores blackouts.
    with pytest.raises(services.BatchError, match="administrators"):
        services.do_create_batch(plan, operator, host=fleet["ha"], ignore_blackouts=True)
    services.do_cancel_batch(batch, operator)
    scheduler.tick(batch.pk)
    forced = services.do_create_batch(plan, admin, host=fleet["ha"], ignore_blackouts=True)
    scheduler.tick(forced.pk)
    assert forced.items.get().job.target == fleet["hb"]


def test_it_plans_and_starts_an_evacuation_through_the_api(fleet, make_vm, operator, login, fake_preflight):
    for i in range(2):
        make_vm(f"api{i}")
    client = login(operator)
    url = f"/api/v1/hosts/{fleet['ha'].pk}/evacuate/"
    plan = client.post(url, {"dry_run": True}, content_type="application/json")
    assert plan.status_code == 200 and not Batch.objects.exists()
    started = client.post(url, {"dry_run": False, "max_parallel": 1}, content_type="application/json")
    assert started.status_code == 202, started.content
    batch = Batch.objects.get()
    assert started["Location"] == f"/api/v1/batches/{batch.pk}/" and batch.max_parallel == 1
    assert batch.items.count() == 2
    assert AuditEvent.objects.filter(action="batch.start", actor=operator).exists()
    detail = client.get(started["Location"]).json()
    assert {row["vm_name"] for row in detail["items"]} == {"api0", "api1"}
    paused = client.post(f"/api/v1/batches/{batch.pk}/pause/")
    assert paused.status_code == 202 and paused.json()["status"] == Batch.PAUSED


def test_it_does_not_queue_again_a_child_released_from_a_blackout_a_moment_ago(batch_of, monkeypatch):
    """A child created long ago and held by a blackout is released (and queued) by a pass:
    the next pass, a moment later, must not queue it again with a "no worker had taken it
    for 15 s" line (its message was sent just now)."""
    batch, job, sent = _one_child_messages_recorded(batch_of, monkeypatch)
    long_ago = timezone.now() - timedelta(minutes=5)
    MigrationJob.objects.filter(pk=job.pk).update(created_at=long_ago, waiting_for="Blackout of rack-a.")
    JobEvent.objects.filter(job=job).update(at=long_ago)
    scheduler.tick(batch.pk)  # the blackout is over: released and queued
    job.refresh_from_db()
    assert job.waiting_for == "" and len(sent) == 2
    scheduler.tick(batch.pk)
    assert len(sent) == 2
    assert not JobEvent.objects.filter(job=job, message__startswith="Queued again").exists()


def test_it_starts_no_child_after_losing_the_lease_during_its_preflight(batch_of, fake_preflight):
    """A preflight may take as long as the lease lasts: when another scheduler took the
    batch meanwhile (and counted the limits without this pass's child), the slow pass
    creates nothing; the item stays pending for the scheduler that holds the batch."""
    batch = batch_of(1)

    def slow(plan):
        # Meanwhile the lease ran out and another scheduler took the batch.
        Batch.objects.filter(pk=batch.pk).update(
            lease_owner="other", lease_until=timezone.now() + timedelta(seconds=20)
        )
        from tests.fleet.conftest import prediction, report

        return report(prediction())

    fake_preflight.answers["vm0"] = slow
    scheduler.tick(batch.pk, owner="slow")
    assert not MigrationJob.objects.exists()
    assert batch.items.get().status == BatchItem.PENDING
    assert not AuditEvent.objects.filter(action="batch.decision").exists()
    batch.refresh_from_db()
    assert batch.lease_owner == "other"  # its lease is left alone


def test_it_does_not_queue_again_a_child_approved_a_moment_ago(batch_of, monkeypatch, admin):
    """A child that waited for approval longer than the re-queue interval is queued by
    its approval: the next pass must not queue it again as lost."""
    from migrations_app.services import do_approve_job

    batch, job, sent = _one_child_messages_recorded(batch_of, monkeypatch)
    long_ago = timezone.now() - timedelta(minutes=5)
    MigrationJob.objects.filter(pk=job.pk).update(created_at=long_ago, status=MigrationJob.PENDING_APPROVAL)
    JobEvent.objects.filter(job=job).update(at=long_ago)
    do_approve_job(job, admin)
    assert len(sent) == 2
    scheduler.tick(batch.pk)
    assert len(sent) == 2
    assert not JobEvent.objects.filter(job=job, message__startswith="Queued again").exists()

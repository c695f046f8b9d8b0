"""migrations_app/apps.py: a default-cluster worker that starts queues the due scheduled
tasks at once (django-q2's own first pass comes 30 s after the cluster's start); the
migrations cluster does not; a second worker's pass queues nothing again."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.conf import Conf
from django_q.models import OrmQ, Schedule

from migrations_app import apps

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def due(settings, tmp_path):
    settings.DATA_DIR = tmp_path  # the broker's wake-up sockets
    Schedule.objects.all().delete()
    return Schedule.objects.create(
        name="test-due",
        func="math.floor",
        args="1.5",
        schedule_type=Schedule.MINUTES,
        minutes=1,
        repeats=-1,
        next_run=timezone.now() - timedelta(seconds=5),
    )


def queued():
    """The queued messages of the schedule's task."""
    return [m for m in OrmQ.objects.all() if m.task.get("func") == "math.floor"]


def test_it_queues_the_due_schedules_when_a_default_worker_starts(due, monkeypatch):
    monkeypatch.setattr(Conf, "CLUSTER_NAME", Conf.PREFIX)
    before = due.next_run
    for i in (1, 2):  # one after the other: the test database is SQLite in memory
        thread = apps._schedule_at_worker_start("django_q", proc_name=f"Process-{i}")
        thread.join(60)
        assert not thread.is_alive()
    assert len(queued()) == 1  # the second worker's pass found nothing due
    due.refresh_from_db()
    assert due.next_run > timezone.now() > before


def test_it_is_connected_to_the_workers_start():
    from django_q.signals import post_spawn

    sync_receivers, _async = post_spawn._live_receivers("django_q")
    assert apps._schedule_at_worker_start in sync_receivers


def test_it_leaves_the_schedules_to_the_default_cluster(due, monkeypatch):
    monkeypatch.setattr(Conf, "CLUSTER_NAME", "migrations")
    assert apps._schedule_at_worker_start("django_q", proc_name="Process-1") is None
    assert queued() == []
    due.refresh_from_db()
    assert due.next_run < timezone.now()

"""Shared job snapshots (migrations_app/streaming.py SnapshotCache): watchers who would
get the same text share one rendering, and a cached text never reaches a viewer of
another masking variant, language or scope. The scope check runs for every watcher."""

import pytest
from django.db.models import F

from migrations_app import streaming
from migrations_app.models import JobEvent, MigrationJob, ProgressSample
from tests.accounts.world import build

pytestmark = pytest.mark.django_db

SECRET_URI = "test:///s1"


@pytest.fixture
def moved(alice, bob):
    """alice-web, now alice's, is being moved by an operator from the secret host s1
    (outside alice's scope) to p1."""
    streaming.snapshots.clear()
    w = build(alice, bob)
    job = MigrationJob.objects.create(
        vm=w.alice_web,
        vm_name=w.alice_web.name,
        source=w.s1,
        source_name=w.s1.name,
        target=w.p1,
        target_name=w.p1.name,
        mode=MigrationJob.LIVE,
        status=MigrationJob.RUNNING,
        phase="memory",
        percent=40.0,
        progress_seq=7,
        error=f"libvirt at {SECRET_URI} answered slowly",
    )
    JobEvent.objects.create(job=job, message=f"Connected to {w.s1.name} ({SECRET_URI}).")
    ProgressSample.objects.create(job=job, t=0.25, rate=1000, remaining=5000)
    yield job
    streaming.snapshots.clear()


def check_texts(html):
    """What each viewer may read of the secret host, from one snapshot."""
    return {"uri": SECRET_URI in html, "name": "s1-secret" in html, "masked": "another host" in html}


@pytest.mark.parametrize("order", ["admin first", "alice first"])
def test_it_never_serves_a_cached_snapshot_to_another_variant(moved, admin, operator, alice, order):
    viewers = [admin, operator, alice] if order == "admin first" else [alice, operator, admin]
    texts = {}
    for user in viewers:
        snap = streaming.job_snapshot(user, moved.pk, "en")
        texts[user.username] = check_texts(snap.html)
    assert texts["admin"] == {"uri": True, "name": True, "masked": False}
    assert texts["operator"] == {"uri": False, "name": True, "masked": False}
    assert texts["alice"] == {"uri": False, "name": False, "masked": True}
    # Three variants, three renderings: nothing was shared across them.
    assert streaming.snapshots.hits == 0 and len(streaming.snapshots.entries) == 3


def test_it_shares_a_snapshot_between_viewers_who_see_the_job_alike(moved, operator, auditor):
    first = streaming.job_snapshot(operator, moved.pk, "en")
    hits = streaming.snapshots.hits
    again = streaming.job_snapshot(auditor, moved.pk, "en")
    assert again is first and streaming.snapshots.hits == hits + 1
    assert first.seq == 7 and "s1-secret" in first.html and SECRET_URI not in first.html


def test_it_renders_each_language_apart(moved, alice):
    english = streaming.job_snapshot(alice, moved.pk, "en").html
    chinese = streaming.job_snapshot(alice, moved.pk, "zh-hans").html
    assert "another host" in english and "另一台宿主机" in chinese
    assert "another host" not in chinese and "s1-secret" not in chinese + english


def test_it_checks_scope_for_every_watcher_of_a_cached_state(moved, operator, bob, mallory):
    assert streaming.job_snapshot(operator, moved.pk, "en") is not None
    for outsider in (bob, mallory):
        assert streaming.job_snapshot(outsider, moved.pk, "en") is None
        assert streaming.job_snapshot(outsider, moved.pk + 1000, "en") is None


def test_it_renders_again_after_any_write(moved, operator):
    first = streaming.job_snapshot(operator, moved.pk, "en")
    MigrationJob.objects.filter(pk=moved.pk).update(percent=63.0, progress_seq=F("progress_seq") + 1)
    second = streaming.job_snapshot(operator, moved.pk, "en")
    assert second is not first and "63.0 %" in second.html and second.seq == 8
    # A column that is not progress_seq, a new log line, a new chart sample: each a new text.
    MigrationJob.objects.filter(pk=moved.pk).update(force_off_requested=True)
    third = streaming.job_snapshot(operator, moved.pk, "en")
    assert third is not second and ":forcing" in third.html
    event = JobEvent.objects.create(job=moved, message="a new line")
    fourth = streaming.job_snapshot(operator, moved.pk, "en")
    assert "a new line" in fourth.html and fourth.last_event_id == event.pk
    ProgressSample.objects.create(job=moved, t=0.5, rate=2000, remaining=4000)
    fifth = streaming.job_snapshot(operator, moved.pk, "en")
    assert fifth is not fourth and "[0.500,2000,4000]" in fifth.html

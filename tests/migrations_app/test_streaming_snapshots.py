"""Shared job snapshots (migrations_app/streaming.py SnapshotCache): watchers who would
get the same text share one rendering, and a cached text never reaches a viewer of
another masking variant, language or scope. The scope check runs for every watcher."""

import asyncio

import pytest
from django.db import connection
from django.db.models import F

from migrations_app import streaming
from migrations_app.models import JobEvent, MigrationJob, ProgressSample
from tests.migrations_app.conftest import SECRET_URI

pytestmark = pytest.mark.django_db


@pytest.fixture
def moved(secret_move):
    """alice-web, now alice's, is being moved by an operator from the secret host s1
    (outside alice's scope) to p1."""
    streaming.snapshots.clear()
    job = secret_move(phase="memory", percent=40.0, progress_seq=7)
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


@pytest.mark.asyncio
async def test_it_never_falls_back_to_another_viewers_fragment(admin, alice):
    """A watcher that subscribed while a tick was being read has no variant in its result:
    it gets nothing from it (its snapshot follows), never the fragment of another viewer."""
    hub = streaming.JobHub()
    got = {}

    def watcher(user, ready=True):
        async def send(text):
            got.setdefault(user.username, []).append(text)

        return streaming.Subscriber(send=send, lang="en", job_id=1, user=user, ready=ready)

    admin_sub, alice_sub, late = watcher(admin), watcher(alice), watcher(alice, ready=False)
    hub.jobs[1] = {admin_sub, alice_sub, late}
    result = streaming.TickResult()
    result.variants[(1, admin.pk)] = ()
    result.progress[(1, "en", ())] = (9, "<unmasked progress>")
    result.events[1] = [(5, {("en", ()): "<unmasked line>"})]
    await hub._dispatch(result)
    assert got == {"admin": ["<unmasked progress><unmasked line>"]}
    assert alice_sub.seq == -1 and late.pending_progress is None and late.pending_events == []


def test_it_renders_a_pushed_row_like_the_database_row(moved, admin, operator, alice):
    """Scale-out: publish_job sends the row; the hub renders it without reading the job,
    per language and masking variant, and the same text as from the database."""
    row = streaming.row_of(moved.pk)
    from_row = streaming.job_from_row(row)
    assert streaming.render_progress(from_row, "en") == streaming.render_progress(
        MigrationJob.objects.get(pk=moved.pk), "en"
    )
    hub = streaming.JobHub()
    users = {u.pk: u for u in (admin, operator, alice)}
    viewers = {("en", admin.pk), ("en", operator.pk), ("en", alice.pk), ("zh-hans", alice.pk)}
    result = hub._render_row(moved.pk, row, viewers, users)
    texts = {
        (lang, pk): result.progress[(moved.pk, lang, result.variants[(moved.pk, pk)])] for lang, pk in viewers
    }
    assert {seq for seq, _html in texts.values()} == {7}
    assert SECRET_URI in texts[("en", admin.pk)][1]
    assert SECRET_URI not in texts[("en", operator.pk)][1] and "s1-secret" in texts[("en", operator.pk)][1]
    for lang in ("en", "zh-hans"):
        html = texts[(lang, alice.pk)][1]
        assert SECRET_URI not in html and "s1-secret" not in html
    assert "另一台宿主机" in texts[("zh-hans", alice.pk)][1]
    assert hub.pushes == 4  # admin, operator, alice in two languages
    # The same state again, or an older one, renders nothing.
    assert hub._render_row(moved.pk, row, viewers, users) is None
    MigrationJob.objects.filter(pk=moved.pk).update(progress_seq=F("progress_seq") + 1)
    assert hub._render_row(moved.pk, streaming.row_of(moved.pk), viewers, users) is not None
    assert hub._render_row(moved.pk, row, viewers, users) is None


@pytest.mark.django_db(transaction=True)  # the DB thread reads committed rows
def test_it_renders_a_pushed_row_on_the_loop_once_the_masks_are_built(moved, admin, alice, monkeypatch):
    """Scale-out: a pushed row is rendered on the event loop (no hop to the DB thread)
    when every watcher's mask is built; a mask still to build, or a render that needs
    the database, goes to the DB thread instead, and the state is not marked pushed
    before a render succeeded. alice never gets the admin's unmasked text."""
    unsafe = "DJANGO_ALLOW_ASYNC_UNSAFE"  # this test's own DB writes, on the loop's thread
    on_thread = []
    real_poller_db = streaming.poller_db

    async def poller_db(fn, *args):
        on_thread.append(fn.__name__)
        return await real_poller_db(fn, *args)

    monkeypatch.setattr(streaming, "poller_db", poller_db)
    got = {}

    def watcher(user):
        async def send(text):
            got.setdefault(user.username, []).append(text)

        return streaming.Subscriber(send=send, lang="en", job_id=moved.pk, user=user, ready=True)

    def next_row(**fields):
        with monkeypatch.context() as m:
            m.setenv(unsafe, "true")
            MigrationJob.objects.filter(pk=moved.pk).update(progress_seq=F("progress_seq") + 1, **fields)
            return streaming.row_of(moved.pk)

    async def scenario():
        hub = streaming.JobHub()
        hub.jobs[moved.pk] = {watcher(admin), watcher(alice)}
        await hub._push(moved.pk, next_row(error=""))  # masks not built yet: the DB thread
        assert on_thread == ["_render_row"] and hub.pushed[moved.pk] == 8
        await hub._push(moved.pk, next_row())  # masks built: on the loop
        assert on_thread == ["_render_row"] and hub.pushed[moved.pk] == 9
        # An error naming the host: masking it for alice reads the job's host rows, which
        # Django refuses on the loop (SynchronousOnlyOperation): done on the DB thread.
        await hub._push(moved.pk, next_row(error=f"libvirt at {SECRET_URI} failed"))
        assert on_thread == ["_render_row", "_render_row"] and hub.pushed[moved.pk] == 10
        await streaming.close_poller_db()
        with monkeypatch.context() as m:
            m.setenv(unsafe, "true")
            connection.close()  # this loop's own connection

    asyncio.run(scenario())
    assert [len(got[name]) for name in ("admin", "alice")] == [3, 3]
    assert SECRET_URI in got["admin"][-1] and "failed" in got["alice"][-1]
    assert not any(SECRET_URI in text or "s1-secret" in text for text in got["alice"])
    assert ['data-seq="10"' in text for text in got["alice"]] == [False, False, True]


def test_it_lets_the_loop_mark_a_push_while_a_tick_reads(moved, admin):
    """A tick runs on the DB thread while the loop renders pushed rows (_push) and marks
    them in ``hub.pushed`` at any moment. A mark added while the tick prunes the marks
    (here: exactly then, as a thread switch can make it) must not fail the tick, which
    would drop what it read (its new log lines are never sent again)."""
    hub = streaming.JobHub()
    hub.pushed = {moved.pk + 1000: 1}

    class Watched(dict):
        def __contains__(self, key):
            hub.pushed[moved.pk + 2000] = 1  # the loop's _push, between two steps
            return super().__contains__(key)

    hub.last_event_id = JobEvent.objects.order_by("pk").last().pk
    line = JobEvent.objects.create(job=moved, message="a new log line")
    result = hub._read_and_render(Watched({moved.pk: {("en", admin.pk)}}), set(), {}, {admin.pk: admin})
    assert result.progress[(moved.pk, "en", ())][0] == 7
    assert [eid for eid, _html in result.events[moved.pk]] == [line.pk]
    assert moved.pk + 1000 not in hub.pushed

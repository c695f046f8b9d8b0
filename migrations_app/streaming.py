"""Live job progress for WebSocket watchers: one DB poller per process, fanned out.

The database row is the truth. Every watcher first gets a snapshot rendered from it; after
that the process's single :class:`JobHub` notices changes and pushes them.

Why a poller: the embedded default (SQLite, no Redis) has no mature cross-process channel
layer (InMemoryChannelLayer lives inside one process), and the worker that writes progress
is another process. So each daphne process runs ONE asyncio task, started with its first
watcher and stopped when the last one leaves, that reads the changed jobs every
``POLL_INTERVAL`` seconds with one query (plus one for new event-log lines when somebody
watches a job page), renders each changed job's partial once per language, and sends that
same text to every local watcher of the job. The cost per tick does not depend on the
number of watchers; only the socket writes do.

Embedded default on a SQLite file: between polls the hub looks at the database files'
size and time stamps every FILE_WATCH_INTERVAL (two stat() calls on the loop) and reads
as soon as they change, so a write waits ~20 ms for the poller instead of half an
interval, at no query cost.

Scale-out (REDIS_URL set, channels-redis' Pub/Sub layer): the worker also calls
:func:`publish_job` after each progress write (one PUBLISH per group); the hub of every
daphne process listens on ONE channel of its own that it adds to the groups ``job-<id>``
/ ``jobs`` it needs. The job's message carries its committed row: the hub renders it for
the job's watchers at once, on the event loop, without a DB read (JobHub._push; on the
DB thread only when masking must read hosts), then wakes the poller, which reads new log
lines and list rows. A lost or late message costs at most one poll interval, and a
message never carries state the DB has not got (publish_job sends a row only outside a
transaction). Every hop on the way (a thread, a process, a Redis round trip) waits for
the scheduler on a loaded host: the path has as few as it can.

Sending: each distinct text is framed once and written as bytes to every daphne socket
that shows it (kvmweb/handshake.py FrameWriter: one send() when the socket has nothing
buffered), not sent through the ASGI stack per socket. A job snapshot (what a watcher
gets first) is rendered once per job state, language and masking variant
(SnapshotCache) and sent as one cached frame; the scope check runs for every watcher,
once for the handshakes of one user and job that wait for it together
(shared_job_snapshot).

Payloads are HTML rendered from the same partials as the first page load; the htmx ws
extension swaps them into the page by id (hx-swap-oob). What a watcher may read of hosts
(names outside their scope, libvirt URIs) is masked by migrations_app/masking.py, the
same as on the pages: a fragment is rendered once per language and masking variant
(watchers who see a job the same way share it), not once per watcher.

Never call libvirt from here: everything below is DB reads and template rendering.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.core.exceptions import SynchronousOnlyOperation, ValidationError
from django.db import DatabaseError, connection
from django.db.models import Count, Max, Q
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone, translation

from kvmweb.accounts.roles import sees_everything
from kvmweb.handshake import close_ws_db, shared_ws_db, text_frame, ws_db
from migrations_app.masking import HostMask
from migrations_app.models import JobEvent, MigrationJob, ProgressSample

log = logging.getLogger(__name__)

# Seconds between two DB reads of the poller. Embedded default: this is the latency
# budget (a sample waits on average half of it). With a real channel layer the worker's
# message wakes the poller at once and this only bounds catch-up after a lost message.
POLL_INTERVAL = float(getattr(settings, "KVMWEB_STREAM_POLL_INTERVAL", 0.12))
POLL_INTERVAL_WITH_LAYER = float(getattr(settings, "KVMWEB_STREAM_POLL_INTERVAL_LAYER", 1.0))
# Embedded default (SQLite file): seconds between two looks at the database file's size
# and time stamps between polls. A commit anywhere changes them; the poller then reads at
# once instead of at its next interval. A look is two stat() calls on the event loop (no
# query, no thread), so the wait for a change is ~this long at a fraction of the cost
# of polling that often. The poll interval still bounds a change the look missed.
FILE_WATCH_INTERVAL = float(getattr(settings, "KVMWEB_STREAM_FILE_WATCH_INTERVAL", 0.02))
# How many of a user's most recent jobs a job list / dashboard snapshot refreshes.
LIST_SNAPSHOT_LIMIT = 20
# Seconds between re-checks of every watcher's session and scope: signing out, losing a
# role or a VM's ownership ends the stream within this time (not only at reconnect).
RECHECK_INTERVAL = float(getattr(settings, "KVMWEB_STREAM_RECHECK_INTERVAL", 15.0))

PROGRESS_TEMPLATE = "migrations_app/partials/job_progress.html"
EVENTS_TEMPLATE = "migrations_app/partials/job_events.html"
ROWS_TEMPLATE = "migrations_app/partials/job_list_rows.html"


# Marks a watcher for whom a tick's result holds no masking variant (see _dispatch).
NO_VARIANT = object()


def group_for_job(job_id):
    return f"job-{int(job_id)}"


JOBS_GROUP = "jobs"


# ---------------------------------------------------------------------------- rendering


def render_progress(job, lang, oob=True):
    """The live progress block of one job (the same partial the job page includes)."""
    with translation.override(lang):
        return render_to_string(PROGRESS_TEMPLATE, {"job": job, "oob": oob})


def render_masked(mask, job, lang):
    """The progress block of ``job`` as ``mask``'s viewer sees it, in ``lang`` (masked
    inside the language: "another host" is translated when the mask writes it)."""
    with translation.override(lang):
        return render_progress(mask.job(job), lang)


def render_events(job_id, events, lang, *, append):
    """Event log lines; append=True wraps them to be added at the end of the log."""
    with translation.override(lang):
        return render_to_string(
            EVENTS_TEMPLATE, {"job_id": job_id, "events": events, "oob": True, "append": append}
        )


def render_rows(jobs, lang):
    """Job list / dashboard rows, each swapped by its id."""
    with translation.override(lang):
        return render_to_string(ROWS_TEMPLATE, {"jobs": jobs, "oob": True})


def scope_language(scope):
    """The UI language of a WebSocket connection, chosen like LocaleMiddleware does for
    pages (language cookie, then Accept-Language), so live fragments match the page."""
    request = HttpRequest()
    request.COOKIES = dict(scope.get("cookies") or {})
    for name, value in scope.get("headers") or []:
        if name == b"accept-language":
            request.META["HTTP_ACCEPT_LANGUAGE"] = value.decode("latin-1")
    return translation.get_language_from_request(request)


@dataclass
class Snapshot:
    html: str
    seq: int
    last_event_id: int
    frame: bytes = b""  # ``html`` as one WebSocket text frame (sent as is to every socket)


class SnapshotCache:
    """Rendered job snapshots shared by watchers who would get the same text.

    A snapshot costs ~13 ms of CPU to render (the progress block, the whole event log,
    the chart's samples); when a thousand pages of one job reconnect at once (a daphne
    restart) most of them would render the very same text. An entry is keyed by
    everything the text depends on: the job's row as read (every column, so any write
    makes a new key), the number and newest id of its log lines and chart samples, the
    language, the time zone, and the viewer's masking variant (``HostMask.variant``:
    whether URIs are shown and which of the job's hosts are "another host"; () for a
    viewer who sees everything as it is). Viewers whose key differs never share text.
    The scope check is not cached: every watcher's snapshot first reads the job through
    ``MigrationJob.objects.restrict(user)``.

    Entries live ``TTL`` seconds (host URIs, which masking replaces, are read through the
    job's host rows, not its own columns) and at most ``SIZE`` are kept. Used from the
    pollers' thread and channels' sync thread: a lock guards the dict."""

    TTL = 5.0
    SIZE = 256

    def __init__(self):
        self.entries = {}  # key -> (expires, Snapshot)
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[0] > time.monotonic():
                self.hits += 1
                return entry[1]
            self.misses += 1
            return None

    def put(self, key, snapshot):
        now = time.monotonic()
        with self.lock:
            if len(self.entries) >= self.SIZE:
                for k in [k for k, (expires, _s) in self.entries.items() if expires <= now]:
                    del self.entries[k]
                while len(self.entries) >= self.SIZE:  # oldest first (dicts keep order)
                    del self.entries[next(iter(self.entries))]
            self.entries[key] = (now + self.TTL, snapshot)

    def clear(self):
        with self.lock:
            self.entries.clear()


snapshots = SnapshotCache()


def _row_key(job):
    """Every column of the job as read: a value that changes with any write to the row."""
    return repr(tuple(getattr(job, f.attname) for f in job._meta.concrete_fields))


def job_snapshot(user, job_id, lang):
    """Everything a job page needs to be current: progress, the whole event log and the
    chart's samples. None when the job does not exist OR is outside the user's scope:
    the caller answers both the same way, so an id reveals nothing.

    The scope check runs for every call; the rendering is shared with earlier viewers of
    the same job state in the same language and masking variant (SnapshotCache)."""
    job = MigrationJob.objects.restrict(user).filter(pk=job_id).first()
    if job is None:
        return None
    mask = HostMask.for_user(user)
    logs = JobEvent.objects.filter(job=job).aggregate(n=Count("pk"), last=Max("pk"))
    charts = ProgressSample.objects.filter(job=job).aggregate(n=Count("pk"), last=Max("pk"))
    key = (
        job.pk,
        _row_key(job),
        (logs["n"], logs["last"]),
        (charts["n"], charts["last"]),
        lang,
        timezone.get_current_timezone_name(),
        mask.variant(job),
    )
    cached = snapshots.get(key)
    if cached is not None:
        return cached
    events = list(JobEvent.objects.filter(job=job))
    samples = job.chart_samples()
    with translation.override(lang):
        html = render_to_string(
            "migrations_app/partials/job_snapshot.html",
            {"job": mask.job(job), "events": mask.events(events, job), "samples": samples, "oob": True},
        )
    snapshot = Snapshot(html, job.progress_seq, events[-1].pk if events else 0, text_frame(html))
    snapshots.put(key, snapshot)
    return snapshot


def list_snapshot(user, lang):
    """Rows of the user's most recent jobs (active ones first) for a list that (re)connects."""
    scoped = MigrationJob.objects.restrict(user)
    jobs = list(scoped.filter(status__in=MigrationJob.ACTIVE_STATES)[:LIST_SNAPSHOT_LIMIT])
    jobs += list(scoped.exclude(pk__in=[j.pk for j in jobs])[: max(0, LIST_SNAPSHOT_LIMIT - len(jobs))])
    jobs.sort(key=lambda j: j.pk, reverse=True)
    if not jobs:
        return ""
    with translation.override(lang):
        return render_rows(HostMask.for_user(user).jobs(jobs), lang)


# ---------------------------------------------------------------------------- the hub

# The pollers' DB work runs on the WebSockets' DB thread (kvmweb/handshake.py ws_db), which
# keeps its connection open: ~8 ticks a second through database_sync_to_async would open
# and close a connection each time (CONN_MAX_AGE=0: on SQLite that is a file open plus the
# PRAGMAs, on PostgreSQL a login). The job snapshots run there too (the handshakes'
# session lookups on a thread of their own). It is closed when the last poller stops, and
# on any DB error (restarted server), so the next call reconnects.


async def poller_db(fn, *args):
    """Run sync DB code on the pollers' thread (never on the event loop)."""
    return await ws_db(fn, *args)


async def shared_job_snapshot(user, job_id, lang):
    """``job_snapshot`` on the pollers' thread; handshakes of the same user, job and
    language that wait for it together share one call (kvmweb/handshake.py Shared: only
    a call not started yet is joined, so each of them subscribed before the read, and
    the scope check is as fresh as if each had run its own)."""
    return await shared_ws_db(("snapshot", user.pk, int(job_id), lang), job_snapshot, user, job_id, lang)


async def close_poller_db():
    """Close the pollers' DB connection (when the last poller stops; tests)."""
    await close_ws_db()


def _watched_files():
    """The SQLite database file and its write-ahead log, or None (another database, or
    an in-memory one: nothing to watch, the poller only polls)."""
    db = settings.DATABASES["default"]
    name = str(db.get("NAME") or "")
    if "sqlite" not in db.get("ENGINE", "") or not name or name == ":memory:" or name.startswith("file:"):
        return None
    return (name, name + "-wal")


def _file_stamp(paths):
    """A value that changes when a transaction commits to the database files."""
    stamp = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamp.append(None)
        else:
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


@dataclass(eq=False)
class Subscriber:
    """One WebSocket watcher. ``send`` is the consumer's coroutine function; ``ready``
    stays False until its scope check and snapshot are done, so nothing is pushed to a
    socket that has not been authorised."""

    send: object
    lang: str
    close: object = None  # coroutine function(code): ends the WebSocket
    # write_frame(frame bytes) -> bool: writes a ready-made text frame to the socket,
    # False when it cannot (kvmweb/handshake.py FrameWriter); None: always ``send``.
    write_frame: object = None
    session_key: str | None = None
    job_id: int | None = None  # None: a job list / dashboard watcher
    user: object = None
    sees_all: bool = False
    ready: bool = False
    seq: int = -1  # progress_seq of the last state this watcher got
    last_event_id: int = 0
    # What arrived while the snapshot was being read (sent, if newer, once ready).
    pending_progress: tuple | None = None
    pending_events: list = field(default_factory=list)
    pending_rows: list = field(default_factory=list)


@dataclass
class TickResult:
    progress: dict = field(default_factory=dict)  # (job_id, lang, variant) -> (seq, html)
    events: dict = field(default_factory=dict)  # job_id -> [(event_id, {(lang, variant): html})]
    rows: dict = field(default_factory=dict)  # lang -> [(job_id, html)] (watchers who see all)
    user_rows: dict = field(default_factory=dict)  # (user pk, lang) -> [(job_id, html)] (the others)
    variants: dict = field(default_factory=dict)  # (job_id, user pk) -> masking variant


class JobHub:
    """The per-process (per event loop) fan-out point between the DB and the watchers."""

    def __init__(self):
        self.jobs = {}  # job_id -> set[Subscriber]
        self.lists = set()  # job list / dashboard watchers
        self.task = None
        self.poller_starts = 0
        self.ticks = 0
        self.renders = 0
        self.file_wakes = 0  # ticks started by a change of the SQLite files (tests)
        self.wake = asyncio.Event()
        # What the poller last saw: job_id -> (progress_seq, status).
        self.seen = {}
        self.active_ids = set()
        self.max_pk = None
        self.last_event_id = None
        self.had_lists = False
        # Real (cross-process) channel layer: one channel per process, not per watcher.
        layer = get_channel_layer()
        self.layer = None if layer is None or isinstance(layer, InMemoryChannelLayer) else layer
        self.channel = None
        self.listener = None
        self.groups = set()
        self.feeds = {}  # name -> another app's live feed (fleet's batch pages), see feed()
        self.pushed = {}  # job_id -> progress_seq last rendered from a pushed row (scale-out)
        self.pushes = 0  # renders from pushed rows (tests)

    # -- subscriptions (all on the event loop thread) --

    def subscribe(self, sub):
        if sub.job_id is None:
            self.lists.add(sub)
        else:
            self.jobs.setdefault(sub.job_id, set()).add(sub)
        self._ensure_running(JOBS_GROUP if sub.job_id is None else group_for_job(sub.job_id))

    def unsubscribe(self, sub):
        emptied = False
        if sub.job_id is None:
            self.lists.discard(sub)
            emptied = not self.lists
        else:
            subs = self.jobs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.jobs[sub.job_id]
                    emptied = True
        if emptied:
            # The last watcher of a job or of the lists left: the poller leaves that
            # group (or stops) at once. Not for every watcher: a thousand pages closing
            # would each start a database read.
            self.wake.set()

    async def activate(self, sub, seq=-1, last_event_id=0):
        """Mark a watcher ready after its snapshot went out, then send whatever the
        poller produced for it in between and is newer than that snapshot. No await
        before `ready` is set, so no tick can be dispatched in between and lost."""
        sub.seq, sub.last_event_id, sub.ready = seq, last_event_id, True
        parts = []
        if sub.pending_progress is not None and sub.pending_progress[0] >= seq:
            sub.seq = sub.pending_progress[0]
            parts.append(sub.pending_progress[1])
        for eid, html in sub.pending_events:
            if eid > sub.last_event_id:
                sub.last_event_id = eid
                parts.append(html)
        parts += sub.pending_rows
        sub.pending_progress, sub.pending_events, sub.pending_rows = None, [], []
        if parts:
            await sub.send("".join(parts))

    def feed(self, name, factory):
        """Another app's live feed ``name`` (made by ``factory()`` on first use), ticked by
        this poller after the jobs while it has watchers. A feed has ``count()``,
        ``groups()`` (channel groups that should wake the poller) and ``async tick(hub)``."""
        if name not in self.feeds:
            self.feeds[name] = factory()
        self._ensure_running()
        return self.feeds[name]

    @property
    def watcher_count(self):
        feeds = sum(f.count() for f in self.feeds.values())
        return len(self.lists) + sum(len(s) for s in self.jobs.values()) + feeds

    @property
    def is_polling(self):
        return self.task is not None and not self.task.done()

    def _ensure_running(self, group=None):
        if not self.is_polling:
            self.poller_starts += 1
            self.wake.clear()
            self.task = asyncio.get_running_loop().create_task(self._run(), name="kvmweb-job-poller")
        elif self.layer is not None and (group is None or group not in self.groups):
            # A watcher of a group this process has not joined: join it promptly. Only
            # then: each wake is a tick (database reads), and a thousand handshakes of
            # one job page would otherwise keep the poller's thread busy with ticks
            # instead of their snapshots.
            self.wake.set()

    # -- the poller --

    async def _run(self):
        try:
            loop = asyncio.get_running_loop()
            next_recheck = loop.time() + RECHECK_INTERVAL
            files = _watched_files() if self.layer is None else None
            while self.watcher_count:
                try:
                    await self._sync_groups()
                except Exception:  # Redis away: keep serving by polling, retry next time
                    log.warning("channel layer unavailable; streaming by polling only", exc_info=True)
                # Before the reads: a commit after this look is seen by the reads or by
                # the next look, never lost between them.
                stamp = _file_stamp(files) if files else None
                try:
                    if loop.time() >= next_recheck:  # before sending more, not after
                        next_recheck = loop.time() + RECHECK_INTERVAL
                        await self._recheck()
                    await self._tick()
                    for feed in list(self.feeds.values()):
                        await feed.tick(self)
                except Exception:  # a DB hiccup must not kill streaming for everyone
                    log.exception("job progress poller tick failed")
                interval = POLL_INTERVAL_WITH_LAYER if self.layer else POLL_INTERVAL
                await self._wait(interval, files, stamp)
                self.wake.clear()
        finally:
            # No await between the last watcher check and here: a subscribe() cannot slip
            # in between and find a poller that is about to stop.
            self.task = None
            self.seen.clear()
            self.pushed.clear()
            self.active_ids.clear()
            self.max_pk = self.last_event_id = None
            self.had_lists = False
            if self.listener is not None:
                self.listener.cancel()
                self.listener = None
            loop = asyncio.get_running_loop()
            if self.layer is not None and self.groups:
                groups, channel, self.groups = self.groups, self.channel, set()
                loop.create_task(self._discard(groups, channel))
            # A fresh channel when the poller starts again: a cancelled receive on the
            # pub/sub layer unsubscribes its channel and forgets it.
            self.channel = None
            if not any(hub.is_polling for hub in list(_hubs.values())):
                loop.create_task(close_poller_db())

    async def _wait(self, interval, files, stamp):
        """Until woken, ``interval`` passed, or (SQLite) the database files changed."""
        if not files:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            except TimeoutError:
                pass
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + interval
        while not self.wake.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=min(FILE_WATCH_INTERVAL, left))
            except TimeoutError:
                pass
            if _file_stamp(files) != stamp:
                self.file_wakes += 1
                return

    async def _discard(self, groups, channel):
        for group in groups:
            try:
                await self.layer.group_discard(group, channel)
            except Exception:
                log.warning("could not leave channel group %s", group, exc_info=True)

    async def _sync_groups(self):
        """Join exactly the groups this process's watchers need (scale-out only)."""
        if self.layer is None:
            return
        if self.channel is None:
            self.channel = await self.layer.new_channel()
        if self.listener is None or self.listener.done():
            self.listener = asyncio.get_running_loop().create_task(self._listen(), name="kvmweb-job-listener")
        wanted = {group_for_job(j) for j in self.jobs}
        if self.lists:
            wanted.add(JOBS_GROUP)
        for feed in self.feeds.values():
            wanted |= feed.groups()
        for group in wanted - self.groups:
            await self.layer.group_add(group, self.channel)
        for group in self.groups - wanted:
            await self.layer.group_discard(group, self.channel)
        self.groups = wanted

    async def _listen(self):
        """A 'job changed' message that carries the job's row (publish_job read it after
        the commit) is rendered from that row for the job's watchers at once, without a
        DB read (_push); any message then wakes the poller, whose read brings the new
        log lines and list rows (and the progress itself when no row came). Messages are
        handled one after another, in the order they came."""
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("channel layer receive failed; relying on polling", exc_info=True)
                await asyncio.sleep(POLL_INTERVAL_WITH_LAYER)
                continue
            job_id, row = message.get("job"), message.get("row")
            if row and job_id in self.jobs:
                await self._push(job_id, row)
            else:
                self.wake.set()

    async def _push(self, job_id, row):
        """Render ``row`` for the job's watchers and send it. On the event loop when the
        watchers' masks are built (rendering a progress block reads nothing from the
        database: ~1 ms per language and masking variant): a hop to the DB thread and
        back cost more than the rendering on a loaded machine (each hop waits for the
        thread to be scheduled). On the DB thread when a mask must be built first, or
        when the rendering touched the database after all (Django refuses that on the
        loop with SynchronousOnlyOperation; nothing is cached until a render succeeded).
        The viewers are read and rendered for without an await in between, so a watcher
        who subscribes meanwhile is left out of this result (see _dispatch), never given
        another viewer's text."""
        subs = self.jobs.get(job_id)
        try:
            if subs:
                viewers = {(s.lang, s.user.pk) for s in subs}
                users = {s.user.pk: s.user for s in subs}
                result = None
                on_loop = all(getattr(u, "_kvmweb_host_mask", None) is not None for u in users.values())
                if on_loop:
                    try:
                        result = self._render_row(job_id, row, viewers, users)
                    except SynchronousOnlyOperation:
                        on_loop = False
                if not on_loop:
                    result = await poller_db(self._render_row, job_id, row, viewers, users)
                if result is not None:
                    await self._dispatch(result)
        except Exception:
            log.exception("rendering a pushed job row failed; the poller catches up")
        finally:
            self.wake.set()

    def _render_row(self, job_id, row, viewers, users):
        """A TickResult with the progress block of the job as ``row`` shows it, once per
        language and masking variant of its watchers; None when the poller or an earlier
        push already had this state or a newer one. Nothing is read from the database
        but what masking needs (a self-service viewer's hosts, the first time)."""
        job = job_from_row(row)
        if job is None or job.pk != job_id:
            return None
        seen = self.seen.get(job_id)
        if self.pushed.get(job_id, -1) >= job.progress_seq or (seen and seen[0] >= job.progress_seq):
            return None
        result = TickResult()
        renders = 0
        for lang, user_pk in viewers:
            mask = HostMask.for_user(users[user_pk])
            variant = mask.variant(job)
            result.variants[(job_id, user_pk)] = variant
            if (job_id, lang, variant) not in result.progress:
                result.progress[(job_id, lang, variant)] = (job.progress_seq, render_masked(mask, job, lang))
                renders += 1
        # Only once every render succeeded: a render refused on the loop is done again
        # on the DB thread.
        self.pushed[job_id] = job.progress_seq
        self.renders += renders
        self.pushes += renders
        return result

    async def _recheck(self):
        """Close the sockets whose session ended or whose user no longer may see the job.

        A handful of queries per interval (sessions, users, one scope query per distinct
        user), not per watcher and not per tick."""
        subs = [s for s in self.lists if s.ready] + [
            s for subs in self.jobs.values() for s in subs if s.ready
        ]
        if not subs:
            return
        keys = {s.session_key: s.user.pk for s in subs if s.session_key}
        wanted = {}
        for s in subs:
            if s.job_id is not None:
                wanted.setdefault(s.user.pk, set()).add(s.job_id)
            else:
                wanted.setdefault(s.user.pk, set())
        live_keys, allowed, users = await poller_db(_still_allowed, keys, wanted)
        for s in subs:
            # Fresh user objects: roles are cached on them, and list scope uses them.
            if s.user.pk in users:
                s.user, s.sees_all = users[s.user.pk]
            if s.session_key is not None and s.session_key not in live_keys:
                code = 4401
            elif s.user.pk not in allowed or (s.job_id is not None and s.job_id not in allowed[s.user.pk]):
                code = 4404 if s.user.pk in allowed else 4401
            else:
                continue
            self.unsubscribe(s)
            if s.close is not None:
                try:
                    await s.close(code)
                except Exception:
                    log.debug("closing a watcher failed", exc_info=True)

    async def _tick(self):
        # Copy what the worker thread needs: the sets change on the loop meanwhile.
        job_langs = {}
        for job_id, subs in self.jobs.items():
            job_langs[job_id] = {(s.lang, s.user.pk) for s in subs}
        list_langs = {s.lang for s in self.lists}
        restricted_users = {}
        for s in self.lists:
            if not s.sees_all:
                restricted_users.setdefault(s.user.pk, (s.user, set()))[1].add(s.lang)
        users = {s.user.pk: s.user for subs in self.jobs.values() for s in subs}
        if not job_langs and not list_langs:
            return
        result = await poller_db(self._read_and_render, job_langs, list_langs, restricted_users, users)
        self.ticks += 1
        await self._dispatch(result)

    def _read_and_render(self, job_langs, list_langs, restricted_users, users):
        """One tick, in a worker thread: one query for the jobs that may have changed,
        one for new event-log lines (only when job pages are watched), then one render
        per changed job, language and masking variant (migrations_app/masking.py).

        ``job_langs``: job id -> {(lang, user pk)} of its watchers; ``restricted_users``:
        user pk -> (user, {langs}) of list watchers who do not see every job; ``users``:
        user pk -> user of the job watchers."""
        result = TickResult()
        masks = {pk: HostMask.for_user(user) for pk, user in users.items()}
        if self.max_pk is None or (list_langs and not self.had_lists):
            # Start (or first list watcher): "new job" means newer than now. Jobs created
            # while nobody watched a list need no replay: the lists' snapshots have them.
            self.max_pk = MigrationJob.objects.aggregate(m=Max("pk"))["m"] or 0
        if self.last_event_id is None:
            self.last_event_id = JobEvent.objects.aggregate(m=Max("pk"))["m"] or 0
        self.had_lists = bool(list_langs)
        cond = Q(pk__in=list(job_langs))
        if list_langs:
            # Lists change when a job is created, or when an active job changes (also
            # into a final state, hence the ids that were active on the previous tick).
            cond |= Q(status__in=MigrationJob.ACTIVE_STATES) | Q(pk__in=list(self.active_ids))
            cond |= Q(pk__gt=self.max_pk)
        jobs = list(MigrationJob.objects.filter(cond))
        changed = []
        for job in jobs:
            state = (job.progress_seq, job.status)
            if self.seen.get(job.pk) != state:
                self.seen[job.pk] = state
                changed.append(job)
            if job.pk > self.max_pk:
                self.max_pk = job.pk
        self.active_ids = {j.pk for j in jobs if j.is_active}
        by_pk = {job.pk: job for job in jobs}
        # The masking variant of each watched job for each of its watchers.
        for job_id, viewers in job_langs.items():
            job = by_pk.get(job_id)
            for _lang, user_pk in viewers:
                mask = masks[user_pk]
                variant = mask.variant(job) if job is not None else ()
                result.variants[(job_id, user_pk)] = variant
        for job in changed:
            if self.pushed.get(job.pk, -1) >= job.progress_seq:
                continue  # its watchers got this state from the channel layer already
            for lang, user_pk in job_langs.get(job.pk, ()):
                variant = result.variants[(job.pk, user_pk)]
                if (job.pk, lang, variant) not in result.progress:
                    html = render_masked(masks[user_pk], job, lang)
                    result.progress[(job.pk, lang, variant)] = (job.progress_seq, html)
                    self.renders += 1
        if list_langs and changed:
            for lang in list_langs:
                result.rows[lang] = [(job.pk, render_rows([job], lang)) for job in changed]
                self.renders += len(changed)
            ids = [j.pk for j in changed]
            rendered = {}  # (job_id, lang, variant) -> html, shared by users who see it alike
            for user_pk, (user, langs) in restricted_users.items():
                visible = set(
                    MigrationJob.objects.restrict(user).filter(pk__in=ids).values_list("pk", flat=True)
                )
                mask = HostMask.for_user(user)
                for lang in langs:
                    rows = []
                    for job in changed:
                        if job.pk not in visible:
                            continue
                        key = (job.pk, lang, mask.variant(job))
                        if key not in rendered:
                            with translation.override(lang):
                                rendered[key] = render_rows([mask.job(job)], lang)
                            self.renders += 1
                        rows.append((job.pk, rendered[key]))
                    result.user_rows[(user_pk, lang)] = rows
        if job_langs:
            new_events = list(JobEvent.objects.filter(pk__gt=self.last_event_id, job_id__in=list(job_langs)))
            if new_events:
                self.last_event_id = max(self.last_event_id, max(e.pk for e in new_events))
            for event in new_events:
                html = {}
                for lang, user_pk in job_langs[event.job_id]:
                    variant = result.variants.get((event.job_id, user_pk), ())
                    if (lang, variant) not in html:
                        job = by_pk.get(event.job_id)
                        with translation.override(lang):  # "another host" in their language
                            shown_event = masks[user_pk].event(event, job) if job is not None else event
                        html[(lang, variant)] = render_events(event.job_id, [shown_event], lang, append=True)
                result.events.setdefault(event.job_id, []).append((event.pk, html))
        # Forget jobs nobody can receive any more (keeps `seen` bounded).
        keep = set(job_langs) | self.active_ids
        for pk in [pk for pk in self.seen if pk not in keep]:
            del self.seen[pk]
        # ``pushed`` also changes on the event loop meanwhile (_push renders there): copy
        # its keys in one step (list() of a dict holds the GIL) before looking at them.
        for pk in [pk for pk in list(self.pushed) if pk not in job_langs]:
            self.pushed.pop(pk, None)
        return result

    async def _dispatch(self, result):
        sends = []
        payload_cache = {}
        for job_id, subs in list(self.jobs.items()):
            events = result.events.get(job_id, [])
            for sub in list(subs):
                variant = result.variants.get((job_id, sub.user.pk), NO_VARIANT)
                if variant is NO_VARIANT:
                    # Subscribed while this result was being read: nothing in it was
                    # rendered for this viewer (never fall back to another viewer's text).
                    # Its snapshot is read after this result, so it misses nothing.
                    continue
                view = (sub.lang, variant)
                progress = result.progress.get((job_id, sub.lang, variant))
                if not sub.ready:
                    if progress is not None:
                        sub.pending_progress = progress
                    sub.pending_events += [(eid, html[view]) for eid, html in events if view in html]
                    continue
                with_progress = progress is not None and progress[0] >= sub.seq
                new = [(eid, html) for eid, html in events if eid > sub.last_event_id and view in html]
                if not with_progress and not new:
                    continue
                # Watchers of one job that see it alike and are at the same point share
                # one payload string.
                key = (job_id, sub.lang, variant, with_progress, sub.last_event_id)
                text = payload_cache.get(key)
                if text is None:
                    parts = [progress[1]] if with_progress else []
                    parts.extend(html[view] for _eid, html in new)
                    text = payload_cache[key] = "".join(parts)
                if with_progress:
                    sub.seq = progress[0]
                if new:
                    sub.last_event_id = new[-1][0]
                sends.append((sub, text))
        for sub in list(self.lists):
            rows = result.rows.get(sub.lang)
            if not rows:
                continue
            if sub.sees_all:
                text = payload_cache.get(("rows", sub.lang))
                if text is None:
                    text = payload_cache[("rows", sub.lang)] = "".join(html for _pk, html in rows)
            else:
                text = "".join(html for _pk, html in result.user_rows.get((sub.user.pk, sub.lang), []))
            if text and not sub.ready:
                sub.pending_rows.append(text)
            elif text:
                sends.append((sub, text))
        await send_all(sends)


async def send_all(sends):
    """Send each (subscriber, text) in turn. A send only hands the frame to the server's
    transport (it never waits for the client), so one after another on the loop costs
    less than a task each through gather: with 1,000 watchers that is 1,000 tasks fewer
    per update. Each distinct text is framed once and written as bytes to the sockets
    that allow it (``Subscriber.write_frame``); the others go through their consumer's
    send. A socket that went away raises; its disconnect cleans up."""
    frames = {}
    for sub, text in sends:
        try:
            if sub.write_frame is not None:
                frame = frames.get(text)
                if frame is None:
                    frame = frames[text] = text_frame(text)
                if sub.write_frame(frame):
                    continue
            await sub.send(text)
        except Exception as exc:
            log.debug("sending job progress failed: %r", exc)


def session_signs_in(data, user):
    """True when decoded session ``data`` still signs ``user`` in, as Django's get_user
    decides for a page: the same user id and a session auth hash that matches the current
    password (a password change ends the other sessions, whose rows stay)."""
    from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY
    from django.utils.crypto import constant_time_compare

    if str(data.get(SESSION_KEY)) != str(user.pk):
        return False
    if not hasattr(user, "get_session_auth_hash"):
        return True
    session_hash = data.get(HASH_SESSION_KEY)
    if not session_hash:
        return False
    hashes = [user.get_session_auth_hash(), *getattr(user, "get_session_auth_fallback_hash", list)()]
    return any(constant_time_compare(session_hash, h) for h in hashes)


def _still_allowed(session_keys, wanted):
    """(session keys still valid, {user pk: job ids of `wanted` still in scope},
    {user pk: (fresh user, sees everything)}); users gone or deactivated are missing.
    ``session_keys``: session key -> the pk of the user its watcher signed in as; a key
    is valid while its session is unexpired and still signs that user in."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    allowed, users = {}, {}
    for user in get_user_model().objects.filter(pk__in=list(wanted), is_active=True):
        users[user.pk] = (user, sees_everything(user))
        job_ids = wanted[user.pk]
        allowed[user.pk] = (
            set(MigrationJob.objects.restrict(user).filter(pk__in=job_ids).values_list("pk", flat=True))
            if job_ids
            else set()
        )
    live = set()
    sessions = Session.objects.filter(session_key__in=list(session_keys), expire_date__gt=timezone.now())
    for session in sessions:
        user = users.get(session_keys[session.session_key], (None,))[0]
        if user is not None and session_signs_in(session.get_decoded(), user):
            live.add(session.session_key)
    return live, allowed, users


_hubs = weakref.WeakKeyDictionary()


def get_hub():
    """The hub of the running event loop (daphne runs one loop per process; tests run
    one loop per test, and a hub must never outlive its loop)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = JobHub()
    return hub


# ---------------------------------------------------------------------------- publishing


def _json_default(value):
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()  # full precision (DjangoJSONEncoder keeps milliseconds)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return str(value)  # Decimal, UUID


def row_of(job_id):
    """The job's row as JSON (every column), read now, or None when it is gone."""
    job = MigrationJob.objects.filter(pk=job_id).first()
    if job is None:
        return None
    data = {f.attname: getattr(job, f.attname) for f in job._meta.concrete_fields}
    return json.dumps(data, default=_json_default)


def job_from_row(row):
    """A MigrationJob built from ``row_of``'s JSON (not saved; related objects, if a
    template asks for one, are read from the database like on any instance)."""
    try:
        data = json.loads(row)
        fields = {f.attname: f.to_python(data[f.attname]) for f in MigrationJob._meta.concrete_fields}
    except (ValueError, KeyError, TypeError, ValidationError):
        log.warning("a pushed job row could not be read; the poller catches up", exc_info=True)
        return None
    job = MigrationJob(**fields)
    job._state.adding = False
    job._state.db = "default"
    return job


class _Publisher:
    """Sends 'job changed' messages from sync code without blocking it.

    channels-redis keeps its connections per event loop; ``async_to_sync`` would make a
    fresh loop (and connection) for every progress write of the worker. Instead one
    daemon thread runs one loop for the process's lifetime and the caller only schedules
    the send (fire and forget; the DB poller is the safety net for a lost message)."""

    def __init__(self, layer):
        self.layer = layer
        self.pending = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kvmweb-publish", daemon=True)
        self.thread.start()
        # A process that exits right after its last write (a command, a recycled worker)
        # would otherwise lose that message to the daemon thread's death; the pollers
        # would still catch up, one catch-up interval late.
        atexit.register(self.flush)

    def flush(self, timeout=2.0):
        deadline = time.monotonic() + timeout
        for future in list(self.pending):
            try:
                future.result(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass

    async def _send(self, job_id, row):
        message = {"type": "job.changed", "job": job_id}
        try:
            await self.layer.group_send(group_for_job(job_id), dict(message, row=row) if row else message)
            await self.layer.group_send(JOBS_GROUP, message)
        except Exception:
            log.warning(
                "publishing job %s change failed; watchers catch up by polling", job_id, exc_info=True
            )

    def publish(self, job_id, row=None):
        future = asyncio.run_coroutine_threadsafe(self._send(job_id, row), self.loop)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)


_publisher = None
_publisher_lock = threading.Lock()


def publish_job(job_id):
    """Tell every daphne process that job ``job_id`` changed (call after the commit).

    Cheap and safe from sync worker code: with the in-memory layer (embedded default,
    nothing crosses processes) it does nothing and the pollers notice the row; with a
    real layer it reads the job's row (one query by primary key) and schedules two group
    messages, returning at once: the job's watchers get that row rendered without
    another read (JobHub._push). Inside a transaction the row is not sent (it is not
    committed yet and may roll back): the message then only wakes the pollers."""
    global _publisher
    layer = get_channel_layer()
    if layer is None or isinstance(layer, InMemoryChannelLayer):
        return
    if _publisher is None or _publisher.layer is not layer:
        with _publisher_lock:
            if _publisher is None or _publisher.layer is not layer:
                _publisher = _Publisher(layer)
    row = None
    if not connection.in_atomic_block:
        try:
            row = row_of(job_id)
        except DatabaseError:
            log.warning("reading job %s to publish it failed; the pollers catch up", job_id, exc_info=True)
    _publisher.publish(int(job_id), row)

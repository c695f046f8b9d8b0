"""The batch page live: its aggregate and one row per VM pushed through the job hub.

A ``BatchFeed`` rides on the process's JobHub (migrations_app/streaming.py, ``hub.feed``):
the hub's poller ticks it after the jobs, on the poller's DB thread, so a batch page costs
no poller of its own. A tick reads, in two queries, a fingerprint of every watched batch
(its status, why it waits, and each item's status, job and the job's progress_seq) and
re-renders the live partial (fleet/partials/batch_live.html) of the batches whose
fingerprint changed, once per language; each batch is read at most every
``MIN_INTERVAL`` seconds and every watcher of that batch gets the same text. The
database is the truth: a watcher first gets a snapshot, then changes.

Scope: the same rule as job sockets. Batch.objects.restrict(user) at connect (anonymous
closed 4401, no such batch OR out of scope closed 4404, one answer for both) and again
every RECHECK_INTERVAL (signed out, role lost: closed the same way). Batches are seen by
the staff roles only, who see every host, so nothing is masked.
"""

from __future__ import annotations

from django.db.models import Count
from django.template.loader import render_to_string
from django.utils import timezone, translation

from fleet.models import Batch, BatchItem
from migrations_app import streaming

TEMPLATE = "fleet/partials/batch_live_oob.html"
MIN_INTERVAL = 0.5  # seconds between two renders of one batch (children write ~4x/s)


def batch_context(batch):
    """What the live partial shows: the aggregate, the items, their child jobs."""
    items = list(batch.items.select_related("job"))
    counts = {s: 0 for s, _label in BatchItem.STATUSES}
    for row in batch.items.values("status").annotate(n=Count("id")):
        counts[row["status"]] = row["n"]
    done = sum(
        counts[s]
        for s in (
            BatchItem.SUCCEEDED,
            BatchItem.FAILED,
            BatchItem.CANCELLED,
            BatchItem.SKIPPED,
            BatchItem.MISSED,
        )
    )
    movable = len(items) - counts[BatchItem.BLOCKED]
    return {
        "batch": batch,
        "items": items,
        "counts": counts,
        "done": done,
        "movable": movable,
        "percent": round(100 * done / movable) if movable else 100,
        "jobs": [i.job for i in items if i.job_id],
        "now": timezone.now(),
    }


def render_batch(batch, lang):
    with translation.override(lang):
        return render_to_string(TEMPLATE, batch_context(batch))


def fingerprints(batch_ids):
    """{batch id: a value that changes whenever its live partial would} (two queries)."""
    out = {
        pk: [(status, waiting)]
        for pk, status, waiting in Batch.objects.filter(pk__in=batch_ids).values_list(
            "pk", "status", "waiting_for"
        )
    }
    rows = BatchItem.objects.filter(batch_id__in=list(out)).order_by("batch_id", "id")
    for row in rows.values_list("batch_id", "id", "status", "job_id", "job__progress_seq", "job__status"):
        out[row[0]].append(row[1:])
    return {pk: tuple(v) for pk, v in out.items()}


def snapshot(user, batch_id, lang):
    """The live partial of a batch in the user's scope, or None (missing or out of scope)."""
    batch = Batch.objects.restrict(user).filter(pk=batch_id).first()
    return None if batch is None else render_batch(batch, lang)


def still_allowed(session_keys, wanted):
    """(live session keys, {user pk: batch ids still in scope}) for the recheck.
    ``session_keys``: session key -> the pk of its watcher's user; a key is live while
    its session is unexpired and still signs that user in (not after a password change)."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.models import Session

    allowed, users = {}, {}
    for user in get_user_model().objects.filter(pk__in=list(wanted), is_active=True):
        users[user.pk] = user
        allowed[user.pk] = set(
            Batch.objects.restrict(user).filter(pk__in=wanted[user.pk]).values_list("pk", flat=True)
        )
    live = set()
    sessions = Session.objects.filter(session_key__in=list(session_keys), expire_date__gt=timezone.now())
    for session in sessions:
        user = users.get(session_keys[session.session_key])
        if user is not None and streaming.session_signs_in(session.get_decoded(), user):
            live.add(session.session_key)
    return live, allowed


class BatchFeed:
    """Watchers of batch pages in this process, ticked by the JobHub's poller."""

    def __init__(self):
        self.subs = {}  # batch id -> set[streaming.Subscriber] (job_id holds the batch id)
        self.seen = {}  # batch id -> fingerprint last rendered
        self.checked_at = {}  # batch id -> loop time of its last read
        self.next_recheck = None
        self.renders = 0

    def count(self):
        return sum(len(s) for s in self.subs.values())

    def groups(self):
        # Children publish to the jobs group on every change: wake the poller (scale-out).
        return {streaming.JOBS_GROUP} if self.subs else set()

    def add(self, sub):
        """Add a watcher whose snapshot went out. The batch is rendered again at the next
        tick (its watchers get the same text twice at worst): a change between the
        snapshot's read and now is never lost."""
        self.subs.setdefault(sub.job_id, set()).add(sub)
        self.seen.pop(sub.job_id, None)
        self.checked_at.pop(sub.job_id, None)

    def remove(self, hub, sub):
        subs = self.subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subs[sub.job_id]
                self.seen.pop(sub.job_id, None)
                self.checked_at.pop(sub.job_id, None)
        hub.wake.set()

    async def tick(self, hub):
        import asyncio

        loop = asyncio.get_running_loop()
        if self.next_recheck is None:
            self.next_recheck = loop.time() + streaming.RECHECK_INTERVAL
        if loop.time() >= self.next_recheck:
            self.next_recheck = loop.time() + streaming.RECHECK_INTERVAL
            await self._recheck(hub)
        now = loop.time()
        due = [
            b for b, subs in self.subs.items() if now - self.checked_at.get(b, -1e9) >= MIN_INTERVAL and subs
        ]
        if not due:
            return
        for batch_id in due:
            self.checked_at[batch_id] = now
        langs = {b: {s.lang for s in self.subs[b]} for b in due}
        changed = await streaming.poller_db(self._read_and_render, langs)
        sends = []
        for batch_id, html in changed.items():
            for sub in list(self.subs.get(batch_id, ())):
                if sub.ready and sub.lang in html:
                    sends.append(sub.send(html[sub.lang]))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)

    def _read_and_render(self, langs):
        """{batch id: {lang: html}} of the watched batches that changed (poller thread)."""
        out = {}
        prints = fingerprints(list(langs))
        for batch_id, langset in langs.items():
            fp = prints.get(batch_id)
            if fp is None or self.seen.get(batch_id) == fp:
                continue
            self.seen[batch_id] = fp
            batch = Batch.objects.get(pk=batch_id)
            out[batch_id] = {lang: render_batch(batch, lang) for lang in langset}
            self.renders += len(langset)
        return out

    async def _recheck(self, hub):
        subs = [s for subs in self.subs.values() for s in subs if s.ready]
        if not subs:
            return
        keys = {s.session_key: s.user.pk for s in subs if s.session_key}
        wanted = {}
        for s in subs:
            wanted.setdefault(s.user.pk, set()).add(s.job_id)
        live, allowed = await streaming.poller_db(still_allowed, keys, wanted)
        for s in subs:
            if s.session_key is not None and s.session_key not in live:
                code = 4401
            elif s.user.pk not in allowed:
                code = 4401
            elif s.job_id not in allowed[s.user.pk]:
                code = 4404
            else:
                continue
            self.remove(hub, s)
            if s.close is not None:
                try:
                    await s.close(code)
                except Exception:
                    pass


def get_feed():
    """This process's batch feed on the running loop's hub."""
    return streaming.get_hub().feed("fleet-batches", BatchFeed)

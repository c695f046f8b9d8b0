"""The header's bell, live: new inbox items pushed through the job hub's WebSocket poller.

An ``InboxFeed`` rides on the process's JobHub (migrations_app/streaming.py, ``hub.feed``),
like the batch pages' feed (fleet/live.py): the hub's poller ticks it on the poller's DB
thread, so the bells of every open page cost no poller of their own. A tick (at most every
``MIN_INTERVAL`` seconds) asks one indexed question: are there audit events after the
newest one it has seen whose action can change a bell (notifications/inbox.py
``LIVE_ACTIONS``)? Only when there are, it reads the inbox again of the watching users
whose bell they may change (a job's end: its requester; a "mark read": that user; a
request, a decision or a host's status: everyone watching), with fresh user rows (a
role taken away counts at once), renders the bell once per user and language, and sends
it to that user's sockets whose bell would read differently. The
toast is made in the browser (static/js/bell.js) from the items newer than the ones the
page had.

Scope: the same rule as the job pages, because the content IS ``inbox.items(user)``
(MigrationJob.restrict, Host.restrict): a user is never sent an item about a job or host
outside their scope, and never another user's bell. Anonymous sockets are closed 4401 at
connect (notifications/consumers.py); every ``RECHECK_INTERVAL`` a signed-out session or
a deactivated user is closed 4401 too. The database is the truth: a watcher first gets a
snapshot, then changes; a change between the snapshot's read and the watcher joining the
feed is caught by rendering that watcher again at the next tick.
"""

from __future__ import annotations

import asyncio

from django.template.loader import render_to_string
from django.utils import timezone, translation

from migrations_app import streaming
from notifications import inbox

TEMPLATE = "notifications/partials/bell.html"
MIN_INTERVAL = 1.0  # seconds between two reads of the audit history
CLOSE_SIGNED_OUT = 4401


def context(user):
    """What the bell partial shows for ``user`` (the HTTP view and the socket alike)."""
    found = inbox.items(user)
    return {
        "items": found,
        "unread": inbox.unread_count(found),
        "latest": found[0].event_id if found else 0,
    }


def fingerprint(ctx):
    """A value that changes whenever the rendered bell would (but for "3 min ago")."""
    return (ctx["unread"], tuple((i.event_id, i.unread) for i in ctx["items"]))


def render(user, lang, ctx=None):
    """(fingerprint, html) of the user's bell, as an out-of-band swap for the socket."""
    ctx = context(user) if ctx is None else ctx
    with translation.override(lang):
        html = render_to_string(TEMPLATE, ctx | {"live": True})
    return fingerprint(ctx), html


def snapshot(user, lang):
    return render(user, lang)


def newest_event_id():
    from kvmweb.audit.models import AuditEvent

    return AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


# Audit actions whose bell changes only for one user: a job's end (its requester) and a
# "mark read" (its actor). The others (a request waiting for approval, a decision, which
# also clears the approvers' item, like a cancel or a missed window; a host going away or coming
# back) may change anyone's.
EVERYONE = object()


def changes_since(after):
    """(newest relevant audit id after ``after``, or ``after``; whose bells may have
    changed: a set of user pks, or EVERYONE). Two small queries at most."""
    from kvmweb.audit.models import AuditEvent
    from migrations_app.models import MigrationJob

    rows = list(
        AuditEvent.objects.filter(id__gt=after, action__in=inbox.LIVE_ACTIONS)
        .order_by("id")
        .values_list("id", "action", "actor_id", "target_id")
    )
    if not rows:
        return after, set()
    users, jobs = set(), set()
    for _pk, action, actor_id, target_id in rows:
        if action == "notifications.read":
            users.add(actor_id)
        elif action == "migration.finish" and str(target_id).isdigit():
            jobs.add(int(target_id))
        else:
            return rows[-1][0], EVERYONE
    if jobs:
        users |= set(MigrationJob.objects.filter(pk__in=jobs).values_list("requested_by_id", flat=True))
    return rows[-1][0], users


def render_for(wanted):
    """{(user pk, lang): (fingerprint, html)} for ``wanted`` {user pk: {langs}}, with fresh
    user rows; users gone or deactivated are left out (their sockets are closed at the
    next recheck)."""
    from django.contrib.auth import get_user_model

    out = {}
    for user in get_user_model().objects.filter(pk__in=list(wanted), is_active=True):
        ctx = context(user)
        for lang in wanted[user.pk]:
            out[(user.pk, lang)] = render(user, lang, ctx)
    return out


def still_signed_in(session_keys, user_pks):
    """(live session keys, active user pks) for the recheck."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.models import Session

    live = set(
        Session.objects.filter(session_key__in=session_keys, expire_date__gt=timezone.now()).values_list(
            "session_key", flat=True
        )
    )
    active = set(
        get_user_model().objects.filter(pk__in=list(user_pks), is_active=True).values_list("pk", flat=True)
    )
    return live, active


class InboxFeed:
    """The bell watchers of this process, ticked by the JobHub's poller."""

    def __init__(self):
        self.subs = set()  # streaming.Subscriber (ready once its snapshot went out)
        self.sent = {}  # Subscriber -> fingerprint of the bell it shows
        self.dirty = set()  # watchers to render at the next tick whatever the audit says
        self.cursor = None  # newest relevant audit id already accounted for
        self.checked_at = -1e9
        self.next_recheck = None
        self.renders = 0
        self.reads = 0

    def count(self):
        return len(self.subs)

    def groups(self):
        # Nothing publishes bell changes on a channel layer: the audit history is read.
        return set()

    def add(self, sub, shown):
        """Add a watcher whose snapshot (fingerprint ``shown``) went out; it is rendered
        again at the next tick and sent only if its bell changed in between."""
        self.subs.add(sub)
        self.sent[sub] = shown
        self.dirty.add(sub)

    def remove(self, hub, sub):
        self.subs.discard(sub)
        self.sent.pop(sub, None)
        self.dirty.discard(sub)
        if not self.subs:
            self.cursor = None
        hub.wake.set()

    async def tick(self, hub):
        loop = asyncio.get_running_loop()
        if not self.subs:
            return
        if self.next_recheck is None:
            self.next_recheck = loop.time() + streaming.RECHECK_INTERVAL
        if loop.time() >= self.next_recheck:
            self.next_recheck = loop.time() + streaming.RECHECK_INTERVAL
            await self._recheck(hub)
        now = loop.time()
        if now - self.checked_at < MIN_INTERVAL and not self.dirty:
            return
        self.checked_at = now
        # The cursor is taken BEFORE the watchers are rendered: an event committed
        # during the render is seen by the next tick (a bell sent twice, never a lost one).
        if self.cursor is None:
            self.cursor, changed = await streaming.poller_db(newest_event_id), set()
        else:
            self.cursor, changed = await streaming.poller_db(changes_since, self.cursor)
        self.reads += 1
        targets = [
            s
            for s in self.subs
            if s.ready and (s in self.dirty or changed is EVERYONE or s.user.pk in changed)
        ]
        self.dirty.clear()
        if not targets:
            return
        wanted = {}
        for s in targets:
            wanted.setdefault(s.user.pk, set()).add(s.lang)
        rendered = await streaming.poller_db(render_for, wanted)
        self.renders += len(rendered)
        sends = []
        for s in targets:
            got = rendered.get((s.user.pk, s.lang))
            if got is None or s not in self.subs or self.sent.get(s) == got[0]:
                continue
            self.sent[s] = got[0]
            sends.append(s.send(got[1]))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)

    async def _recheck(self, hub):
        subs = [s for s in self.subs if s.ready]
        if not subs:
            return
        keys = {s.session_key for s in subs if s.session_key}
        live, active = await streaming.poller_db(still_signed_in, keys, {s.user.pk for s in subs})
        for s in subs:
            if (s.session_key is not None and s.session_key not in live) or s.user.pk not in active:
                self.remove(hub, s)
                if s.close is not None:
                    try:
                        await s.close(CLOSE_SIGNED_OUT)
                    except Exception:  # noqa: BLE001 - the socket is already gone
                        pass


def get_feed():
    """This process's bell feed on the running loop's hub."""
    return streaming.get_hub().feed("notifications-bell", InboxFeed)

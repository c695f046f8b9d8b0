"""WebSocket consumers for live job progress (job page) and live job states (lists).

Both are thin: authenticate, scope-check through ``MigrationJob.objects.restrict(user)``,
send a snapshot rendered from the DB, then register with the process's JobHub, which
pushes changes (see streaming.py). Nothing is ever read from the client.

Close codes (sent after accepting, so the browser sees the code; the htmx ws extension
reconnects only on 1006/1011/1012/1013, so these end the retries):
4401 not signed in; 4404 no such job OR not in the user's scope (one answer for both, so
guessing ids reveals nothing). A handshake whose Origin is not exactly the site's own (or a
trusted one) is refused before it gets here, and a path that matches no route is closed
with 4404 (kvmweb/limits.py, wired in kvmweb/asgi.py).
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from kvmweb.accounts.roles import sees_everything
from migrations_app import streaming

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


# Every hub socket (job pages, lists, and the bell and batch pages built on this class)
# gets everything from the hub, which listens on ONE channel per process: an alias with
# no layer behind it spares each socket a channel of its own (on Redis Pub/Sub, a
# SUBSCRIBE round trip in every handshake and one more subscription per open page).
NO_CHANNEL_LAYER = "kvmweb-hub-only"


class _HubConsumer(AsyncWebsocketConsumer):
    channel_layer_alias = NO_CHANNEL_LAYER
    sub = None

    async def _accepted_user(self):
        """Accept the socket; the signed-in user, or None after closing it with 4401
        (accepted first so the browser sees the close code, not a failed handshake)."""
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return None
        return user

    async def _send_text(self, text):
        await self.send(text_data=text)

    async def _close(self, code):
        self.sub = None  # the hub already dropped it
        await self.close(code=code)

    def _subscriber(self, user, **kwargs):
        session = self.scope.get("session")
        return streaming.Subscriber(
            send=self._send_text,
            close=self._close,
            session_key=getattr(session, "session_key", None),
            write_frame=self.scope.get("kvmweb_frame_writer"),
            lang=streaming.scope_language(self.scope),
            user=user,
            **kwargs,
        )

    async def disconnect(self, code):
        if self.sub is not None:
            streaming.get_hub().unsubscribe(self.sub)
            self.sub = None

    async def receive(self, text_data=None, bytes_data=None):
        """Watchers only listen; anything sent is ignored."""


class JobProgressConsumer(_HubConsumer):
    """ws/jobs/<id>/: one job's progress, figures and event log."""

    async def connect(self):
        user = await self._accepted_user()
        if user is None:
            return
        job_id = self.scope["url_route"]["kwargs"]["job_id"]
        # Register before reading the snapshot, but not ready: the hub pushes nothing to
        # it until the scope check below passed; what the poller produces meanwhile is
        # kept and sent by activate() if it is newer than the snapshot.
        self.sub = self._subscriber(user, job_id=job_id)
        hub = streaming.get_hub()
        hub.subscribe(self.sub)
        # On the pollers' DB thread (its connection stays open), not channels' one sync
        # thread: a thousand handshakes' session lookups are not queued behind a thousand
        # snapshots, and watchers of one job state share one rendering (SnapshotCache).
        snapshot = await streaming.shared_job_snapshot(user, job_id, self.sub.lang)
        if snapshot is None:
            hub.unsubscribe(self.sub)
            self.sub = None
            await self.close(code=CLOSE_NOT_FOUND)
            return
        # The snapshot's frame is made once per cached snapshot: the socket gets the
        # same bytes as the other watchers of that state (kvmweb/handshake.py FrameWriter).
        if not (snapshot.frame and self.sub.write_frame is not None and self.sub.write_frame(snapshot.frame)):
            await self.send(text_data=snapshot.html)
        await hub.activate(self.sub, snapshot.seq, snapshot.last_event_id)


class JobListConsumer(_HubConsumer):
    """ws/jobs/: state changes of the jobs the user may see (job list, dashboard)."""

    async def connect(self):
        user = await self._accepted_user()
        if user is None:
            return
        sees_all = await database_sync_to_async(sees_everything)(user)
        self.sub = self._subscriber(user, job_id=None, sees_all=sees_all)
        hub = streaming.get_hub()
        hub.subscribe(self.sub)
        html = await database_sync_to_async(streaming.list_snapshot)(user, self.sub.lang)
        if html:
            await self.send(text_data=html)
        await hub.activate(self.sub)

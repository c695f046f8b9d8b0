"""WebSocket consumer of the header's bell: ws/notifications/ (count and list, live).

Thin, like the job and batch sockets (migrations_app/consumers.py, fleet/consumers.py):
authenticate (anonymous: closed 4401, after accepting so the browser reads the code and
stops retrying), send the user's own bell rendered from the database (notifications/
inbox.py: scoped by MigrationJob.restrict and Host.restrict, the job pages' rule), then
join the process's bell feed on the job hub (notifications/live.py), which pushes
changes. The socket carries no id: a user can only ever ask for their own bell, so there
is nothing to guess. Nothing is read from the client.
"""

from channels.db import database_sync_to_async

from migrations_app import streaming
from migrations_app.consumers import _HubConsumer
from notifications import live


class BellConsumer(_HubConsumer):
    """ws/notifications/: the signed-in user's bell."""

    async def connect(self):
        user = await self._accepted_user()
        if user is None:
            return
        sub = self._subscriber(user, job_id=None)
        shown, html = await database_sync_to_async(live.snapshot)(user, sub.lang)
        await self.send(text_data=html)
        sub.ready = True
        self.sub = sub
        live.get_feed().add(sub, shown)

    async def disconnect(self, code):
        if self.sub is not None:
            live.get_feed().remove(streaming.get_hub(), self.sub)
            self.sub = None

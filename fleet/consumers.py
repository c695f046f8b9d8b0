"""WebSocket consumer of the batch page: ws/batches/<id>/ (aggregate and rows, live).

Thin, like the job sockets (migrations_app/consumers.py): authenticate, scope-check
through ``Batch.objects.restrict(user)``, send the snapshot, then join the process's
batch feed on the job hub (fleet/live.py), which pushes changes. Close codes: 4401 not
signed in; 4404 no such batch OR out of scope (one answer for both).
"""

from channels.db import database_sync_to_async

from fleet import live
from migrations_app import streaming
from migrations_app.consumers import CLOSE_NOT_FOUND, _HubConsumer


class BatchConsumer(_HubConsumer):
    """ws/batches/<id>/: one batch's aggregate progress and its item rows."""

    async def connect(self):
        user = await self._accepted_user()
        if user is None:
            return
        batch_id = self.scope["url_route"]["kwargs"]["batch_id"]
        sub = self._subscriber(user, job_id=batch_id)
        html = await database_sync_to_async(live.snapshot)(user, batch_id, sub.lang)
        if html is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send(text_data=html)
        sub.ready = True
        self.sub = sub
        live.get_feed().add(sub)

    async def disconnect(self, code):
        if self.sub is not None:
            live.get_feed().remove(streaming.get_hub(), self.sub)
            self.sub = None

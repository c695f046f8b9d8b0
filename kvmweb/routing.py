"""WebSocket URL routes (each consumer checks scope itself)."""

from django.urls import path, register_converter

from fleet.consumers import BatchConsumer
from migrations_app import consumers
from notifications.consumers import BellConsumer


class JobId:
    """A job id as the database can hold it (at most 18 digits): a longer number is no
    route (closed with 4404 by kvmweb.limits.NoRoute), not an overflow inside a query."""

    regex = "[0-9]{1,18}"

    def to_python(self, value):
        return int(value)

    def to_url(self, value):
        return str(value)


register_converter(JobId, "jobid")

websocket_urlpatterns = [
    path("ws/jobs/", consumers.JobListConsumer.as_asgi()),
    path("ws/jobs/<jobid:job_id>/", consumers.JobProgressConsumer.as_asgi()),
    path("ws/batches/<jobid:batch_id>/", BatchConsumer.as_asgi()),
    path("ws/notifications/", BellConsumer.as_asgi()),
]

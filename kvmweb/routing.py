"""WebSocket URL routes (each consumer checks scope itself)."""

from django.urls import path

from migrations_app import consumers

websocket_urlpatterns = [
    path("ws/jobs/", consumers.JobListConsumer.as_asgi()),
    path("ws/jobs/<int:job_id>/", consumers.JobProgressConsumer.as_asgi()),
]

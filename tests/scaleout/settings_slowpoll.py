"""kvmweb's settings with the streaming poller slowed to a minute: a daphne process run
with these can only deliver an update promptly if the channel layer (Redis) woke it."""

from kvmweb.settings import *  # noqa: F403

KVMWEB_STREAM_POLL_INTERVAL = 60.0
KVMWEB_STREAM_POLL_INTERVAL_LAYER = 60.0

"""django-q2 entry point: the notification dispatcher on the default cluster (scheduled
every minute by notifications/migrations/0002; each run passes every ``every`` seconds
for about a minute, so a notification leaves within a few seconds of its event)."""

import time

from kvmweb import workers
from notifications import dispatch


def dispatch_watch(duration=55.0, every=2.0):
    deadline = time.monotonic() + duration
    totals = {"created": 0, "sent": 0, "failed": 0}
    while True:
        for key, value in dispatch.dispatch().items():
            totals[key] += value
        if time.monotonic() + every > deadline:
            return totals
        if workers.wait(every):  # the cluster is stopping: end now (kvmweb/workers.py)
            return totals

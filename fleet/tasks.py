"""django-q2 entry points of the fleet app.

``batch_watch`` runs on the default cluster from a schedule (fleet/migrations/
0002_batch_schedule.py): it passes over every active batch every few seconds for about
a minute (django-q2 schedules have minute granularity, so each run covers the minute
until the next). Each pass claims its batch first, so overlapping runs are harmless.
"""

import time

from fleet import scheduler


def batch_watch(duration=55.0, every=2.0):
    """Run scheduler passes every ``every`` seconds for ``duration`` seconds."""
    deadline = time.monotonic() + duration
    while True:
        scheduler.run_active()
        if time.monotonic() + every > deadline:
            return
        time.sleep(every)

"""django-q2 entry points of the fleet app.

``batch_watch`` runs on the default cluster from a schedule (fleet/migrations/
0002_batch_schedule.py): it passes over every active batch every few seconds for about
a minute (django-q2 schedules have minute granularity, so each run covers the minute
until the next), and at once when a child ends. Each pass claims its batch first, so
overlapping runs are harmless.
"""

import time

from fleet import scheduler
from kvmweb import workers


def batch_watch(duration=55.0, every=2.0):
    """Run scheduler passes every ``every`` seconds, and at once when a batch's child
    ends (scheduler.wait_for_work), for ``duration`` seconds; ends early when the
    cluster stops (kvmweb/workers.py)."""
    deadline = time.monotonic() + duration
    while True:
        passes = scheduler.run_active()
        if time.monotonic() + every > deadline:
            return
        # Nothing to react to, or another scheduler holds a lease (an ended child stays
        # "work" until that one passes: waking at it would spin): wait the interval.
        if not passes or None in passes.values():
            if workers.wait(every):
                return
        elif scheduler.wait_for_work(None, every, stop=workers.wait, react=0.1):
            return

"""Prompt shutdown of django-q2 workers that run minute-long loops.

On SIGTERM the qcluster process sets its cluster's stop event, and the sentinel then waits
for each worker to finish its current task. The default cluster's watch tasks
(``migrations_app.tasks.reconcile_watch``, ``notifications.tasks.dispatch_watch``) loop for
about a minute, so an idle-looking cluster held a SIGTERM for up to a minute (over 90 s
on a loaded host). ``wait()`` lets such a loop sleep until the cluster is asked to stop.

django-q2 does not hand the stop event to workers. On Linux it forks them (its
``get_mp_context`` prefers "fork") from a method of its ``Sentinel``, so the forked worker
still has that call on its stack: ``cluster_stop_event`` finds the sentinel there. The
event is a multiprocessing Event (a shared semaphore), so the worker sees it set by the
parent. Outside a worker (tests, ``manage.py`` calls) there is no event and ``wait``
just sleeps.
"""

import sys
import time

_UNSET = object()
_event = _UNSET


def cluster_stop_event():
    """The stop event of the django-q2 cluster this worker process belongs to, or None."""
    global _event
    if _event is _UNSET:
        _event = None
        from django_q.cluster import Sentinel  # the forked worker runs under it

        frame = sys._getframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Sentinel):
                _event = getattr(owner, "stop_event", None)
                break
            frame = frame.f_back
    return _event


# How often a waiting loop looks at the stop event (wait): the longest a SIGTERM waits
# for it, beyond the loop's current pass.
STOP_CHECK_SECONDS = 0.5


def _is_set(event):
    """The event's flag, read without its lock. ``Event.is_set`` takes the event's
    Condition lock, and a worker killed while holding it (SIGTERM to the whole process
    group, the OOM killer) would leave the cluster's ``stop()`` blocked on it forever;
    the flag's semaphore value is read atomically without taking anything."""
    try:
        return event._flag._semlock._get_value() > 0
    except (AttributeError, NotImplementedError):  # not CPython's multiprocessing Event
        return event.is_set()


def stopping():
    """Whether this worker's cluster was asked to stop."""
    event = cluster_stop_event()
    return event is not None and _is_set(event)


def wait(seconds):
    """Sleep ``seconds`` or until the cluster is asked to stop; True when it was.

    Looks at the event every STOP_CHECK_SECONDS instead of ``event.wait``: a process
    waiting in ``Event.wait`` counts as a sleeper of the event's Condition, and
    ``Event.set`` (the cluster's stop) waits until every counted sleeper has woken. A
    worker killed in that wait (SIGTERM to the whole process group, `pkill -f qcluster`)
    never wakes, and the cluster hung in its stop for good (seen: over 10 minutes)."""
    event = cluster_stop_event()
    if event is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while not _is_set(event):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(STOP_CHECK_SECONDS, left))
    return True

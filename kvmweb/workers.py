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


def stopping():
    """Whether this worker's cluster was asked to stop."""
    event = cluster_stop_event()
    return event is not None and event.is_set()


def wait(seconds):
    """Sleep ``seconds`` or until the cluster is asked to stop; True when it was."""
    event = cluster_stop_event()
    if event is None:
        time.sleep(seconds)
        return False
    return event.wait(seconds)

"""django-q2's ORM broker, woken at once by a task queued on the same machine.

The ORM broker's pusher (one process per cluster) reads the queue table, and when it
finds nothing sleeps the cluster's ``poll`` before reading again. A migration waits for
that: queue pickup was 50-150 ms of every wizard migration on a loaded host
(benchmarks/migrate_vs_virsh.py). Here each pusher waits on a Unix datagram socket of its
own, ``<data dir>/qwake/<queue>.<pid>`` (in the 0700 data directory, 0600), for at most
``poll``; a process that queues a task (``enqueue``: the web request that created a job,
a manage.py command) sends one byte to every socket of that queue, so the pusher reads
the table at once. Pushers on other machines (several machines on PostgreSQL) get no
datagram and find the message at their next poll, as before; a lost or refused datagram
costs at most one poll. Nothing else changes: the message is the same row, taken by the
same conditional UPDATE.

Settings: Q_CLUSTER["broker_class"] = "kvmweb.qbroker.WakeableORM".

The same wake-up serves other loops that would poll the database: ``Listener(name)``
binds ``<data dir>/qwake/<name>.<pid>`` once per process and ``wake(name)`` reaches it
(the batch scheduler, woken when a job ends: migrations_app/lifecycle.py ENDED).
"""

import os
import select
import socket

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf

WAKE_DIR = "qwake"


def wake_dir():
    return os.path.join(str(settings.DATA_DIR), WAKE_DIR)


def wake(queue):
    """Wake every pusher (or Listener) of ``queue`` on this machine (best effort, never
    raises); returns how many were sent a wake-up."""
    try:
        names = [n for n in os.listdir(wake_dir()) if n.rpartition(".")[0] == queue]
    except OSError:
        return 0
    woken = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for name in names:
            path = os.path.join(wake_dir(), name)
            try:
                sock.sendto(b"1", path)
                woken += 1
            except ConnectionRefusedError:
                # Nobody bound: left by a pusher that was killed. Its successor binds a
                # path of its own (its PID), so removing this one takes nothing away.
                try:
                    os.unlink(path)
                except OSError:
                    pass
            except OSError:
                pass  # e.g. its buffer is full: it has been woken already
    return woken


def _bind(name):
    """A non-blocking datagram socket bound to ``<wake dir>/<name>.<pid>``, or None when
    it cannot be bound (then the caller polls). The socket file is made 0600 after the
    bind, not through the umask (process-wide: another thread's files would get it); in
    between it is in the 0700 wake directory of the 0700 data directory."""
    path = os.path.join(wake_dir(), f"{name}.{os.getpid()}")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        os.makedirs(wake_dir(), mode=0o700, exist_ok=True)
        try:
            os.unlink(path)  # a PID reused after a killed process
        except FileNotFoundError:
            pass
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.setblocking(False)
    except OSError:
        sock.close()
        return None
    return sock


def _drain(sock):
    """Read every wake-up sent meanwhile: one look at the database answers them all."""
    while True:
        try:
            sock.recv(64)
        except OSError:
            return


_listeners = {}  # socket path -> (pid, socket or None)


class Listener:
    """Wake-ups sent to ``name`` (``wake(name)``) by processes on this machine, for a loop
    that would otherwise poll the database: ``wait(seconds)`` returns True when woken,
    False when the time ran out (the queue's pushers wait on one too). One socket per
    process and name, bound on first use and kept: binding and removing it around every
    wait would let a sender that found it closed remove the next one's path. A wake-up
    sent while nobody waited is read by the next ``wait``, which then returns at once
    (the caller looks at the database once more: harmless)."""

    def __init__(self, name):
        key = os.path.join(wake_dir(), name)
        pid, sock = _listeners.get(key, (None, None))
        if pid != os.getpid():  # first use in this process (or a fork of its owner)
            sock = _bind(name)
            _listeners[key] = (os.getpid(), sock)
        self.sock = sock

    def wait(self, seconds):
        if self.sock is None:
            select.select([], [], [], seconds)
            return False
        readable, _, _ = select.select([self.sock], [], [], seconds)
        if readable:
            _drain(self.sock)
        return bool(readable)


class WakeableORM(ORM):
    """The ORM broker; ``enqueue`` wakes the queue's pushers, ``dequeue`` waits for a
    wake-up or ``poll`` (the ORM broker sleeps ``poll``)."""

    def enqueue(self, task):
        pk = super().enqueue(task)
        # After the commit: woken before it, the pusher would read a table without the
        # row and sleep its whole poll (django-q2's scheduler queues inside a transaction).
        queue = self.list_key or Conf.CLUSTER_NAME
        transaction.on_commit(lambda: wake(queue), using=Conf.ORM)
        return pk

    def dequeue(self):
        # As ORM.dequeue (django-q2 1.11), with _wait instead of its sleep.
        tasks = self.get_connection().filter(key=self.list_key, lock__lt=timezone.now())[0 : Conf.BULK]
        if tasks:
            task_list = []
            for task in tasks:
                if self.get_connection().filter(id=task.id, lock=task.lock).update(lock=self.timeout(task)):
                    task_list.append((task.pk, task.payload))
                # else another cluster was faster on that task
            return task_list
        self._wait(Conf.POLL)

    def _wait(self, seconds):
        # This process's wake-up socket for the queue, bound on first use (the pusher is
        # forked from the process that made the broker); without one it polls as the
        # ORM broker does.
        Listener(self.list_key).wait(seconds)

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

One task per free worker (``ONE_PER_WORKER`` queues: migrations). django-q2's pusher
takes every task it can get and queues it locally for its cluster's workers: woken
together, one cluster's pusher took five of eight migrations queued at once while the
other cluster had idle workers, and the fifth waited for a whole migration on a busy
worker (benchmarks/concurrent_migrations.py, two clusters of four: 8 jobs on 7 worker
processes, pickup up to 2.8 s; a long migration would hold it until reconcile's lost-
message check queued it again, ~20 s). Here such a queue's pusher takes a task only
while a worker of its own cluster is free: each worker marks the task it runs in a file
of its own, ``<data dir>/qbusy/<queue>.<cluster pid>.<worker pid>`` (its start count,
under an exclusive flock held while it runs: ``working``), and the pusher counts its
cluster's workers (same parent process) that hold one, plus the tasks it handed out that
no worker has started yet. A worker killed mid-task lets go of its flock with its
process. A worker that ends a task wakes the pusher.

The same wake-up serves other loops that would poll the database: ``Listener(name)``
binds ``<data dir>/qwake/<name>.<pid>`` once per process and ``wake(name)`` reaches it
(the batch scheduler, woken when a job ends: migrations_app/lifecycle.py ENDED).
"""

import fcntl
import os
import select
import socket
import time
from contextlib import contextmanager

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf

WAKE_DIR = "qwake"
BUSY_DIR = "qbusy"
# Queues whose tasks run long: their pushers take a task only for a free worker.
ONE_PER_WORKER = ("migrations",)
# The longest a pusher waits for a worker to start the task it handed out before it looks
# at its workers again (a worker that took it starts within milliseconds).
START_WAIT_SECONDS = 0.5


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


def busy_dir():
    return os.path.join(str(settings.DATA_DIR), BUSY_DIR)


def cluster_id():
    """The cluster a pusher or worker process belongs to: its parent (django-q2's
    sentinel forks both)."""
    return os.getppid()


_marks = {}  # <busy dir>/<queue> -> (pid, fd, start count) of this worker process's busy file


@contextmanager
def working(queue):
    """Around one task of ``queue`` in a worker process of a cluster: its busy file holds
    this worker's start count under an exclusive flock while the task runs (module
    docstring); the queue's pusher is woken once it ends. Nothing for a queue that is not
    ONE_PER_WORKER. Best effort: without a file the pusher's wait for the task to start
    runs out, and it goes on as django-q2's would."""
    if queue not in ONE_PER_WORKER:
        yield
        return
    key = os.path.join(busy_dir(), queue)
    pid, fd, count = _marks.get(key, (None, None, 0))
    if pid != os.getpid():  # first task of this process (or a fork of its owner)
        fd, count = None, 0
        try:
            os.makedirs(busy_dir(), mode=0o700, exist_ok=True)
            fd = os.open(
                os.path.join(busy_dir(), f"{queue}.{cluster_id()}.{os.getpid()}"),
                os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                0o600,
            )
        except OSError:
            fd = None
    if fd is not None:
        count += 1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.pwrite(fd, str(count).encode(), 0)
        except OSError:
            pass
    _marks[key] = (os.getpid(), fd, count)
    try:
        yield
    finally:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
        wake(queue)


def workers_of(queue, cluster):
    """(busy, started) of the cluster whose processes have parent ``cluster``: how many
    of its workers run a task of ``queue`` now, and how many tasks they started in all
    (workers gone included: their count stays in their file)."""
    busy = started = 0
    prefix = f"{queue}.{cluster}."
    try:
        names = [n for n in os.listdir(busy_dir()) if n.startswith(prefix)]
    except OSError:
        return 0, 0
    for name in names:
        try:
            fd = os.open(os.path.join(busy_dir(), name), os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                started += int(os.pread(fd, 32, 0) or b"0")
            except ValueError:
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                busy += 1
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return busy, started


def _sweep(queue):
    """Remove the busy files of clusters that are gone (their parent process ended): a
    pusher starting looks once."""
    try:
        names = [n for n in os.listdir(busy_dir()) if n.startswith(f"{queue}.")]
    except OSError:
        return
    for name in names:
        try:
            os.kill(int(name.split(".")[-2]), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(busy_dir(), name))
            except OSError:
                pass
        except (ValueError, OSError):
            pass  # not ours to judge (another user's process: PermissionError)


class WakeableORM(ORM):
    """The ORM broker; ``enqueue`` wakes the queue's pushers, ``dequeue`` waits for a
    wake-up or ``poll`` (the ORM broker sleeps ``poll``), and for a ONE_PER_WORKER queue
    takes a task only while a worker of its cluster is free (module docstring)."""

    handed = 0  # tasks this pusher returned (ONE_PER_WORKER queues)
    started_before = None  # its workers' start count when it began

    def enqueue(self, task):
        pk = super().enqueue(task)
        # After the commit: woken before it, the pusher would read a table without the
        # row and sleep its whole poll (django-q2's scheduler queues inside a transaction).
        queue = self.list_key or Conf.CLUSTER_NAME
        transaction.on_commit(lambda: wake(queue), using=Conf.ORM)
        return pk

    def dequeue(self):
        # As ORM.dequeue (django-q2 1.11), with _wait instead of its sleep, and one task
        # at a time for a free worker on a ONE_PER_WORKER queue.
        free = self._free_workers()
        if free is not None and free < 1:
            self._wait(Conf.POLL)  # a worker that ends a task wakes it
            return None
        tasks = self.get_connection().filter(key=self.list_key, lock__lt=timezone.now())[
            0 : Conf.BULK if free is None else 1
        ]
        if tasks:
            task_list = []
            for task in tasks:
                if self.get_connection().filter(id=task.id, lock=task.lock).update(lock=self.timeout(task)):
                    task_list.append((task.pk, task.payload))
                # else another cluster was faster on that task
            if free is not None:
                self.handed += len(task_list)
            return task_list
        self._wait(Conf.POLL)

    def _free_workers(self):
        """How many of this pusher's cluster's workers are free, less the tasks it
        handed out that none has started yet; None for a queue whose pusher takes what
        it can (not ONE_PER_WORKER). When those tasks are all that fills the cluster, it
        waits briefly for them to start, then forgets one that did not (a worker killed
        as it took it: the lost-message check sends it again)."""
        if self.list_key not in ONE_PER_WORKER:
            return None
        if self.started_before is None:
            _sweep(self.list_key)
        deadline = time.monotonic() + START_WAIT_SECONDS
        while True:
            busy, started = workers_of(self.list_key, cluster_id())
            if self.started_before is None or started - self.started_before > self.handed:
                # First look, or started tasks another pusher of this cluster handed out
                # (one that died and was replaced): count from here.
                self.started_before = started - self.handed
            waiting = self.handed - (started - self.started_before)
            free = Conf.WORKERS - busy - waiting
            if free >= 1 or not waiting:
                return free
            if time.monotonic() >= deadline:
                self.handed -= waiting  # forgotten
                return Conf.WORKERS - busy
            time.sleep(0.005)  # a worker is taking one from the local queue

    def _wait(self, seconds):
        # This process's wake-up socket for the queue, bound on first use (the pusher is
        # forked from the process that made the broker); without one it polls as the
        # ORM broker does.
        Listener(self.list_key).wait(seconds)

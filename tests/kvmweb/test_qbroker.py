"""kvmweb/qbroker.py: a task queued on this machine wakes the queue's pusher at once
instead of its next poll; other queues' pushers sleep on; a socket left by a killed
pusher is removed by the next sender."""

import fcntl
import os
import socket
import threading
import time

import pytest

from kvmweb import qbroker

pytestmark = pytest.mark.django_db


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    return tmp_path


class Waiting(threading.Thread):
    """A pusher's wait (for at most ``seconds``) in a thread; ``took`` when it ended."""

    def __init__(self, broker, seconds):
        super().__init__(daemon=True)
        self.broker, self.seconds, self.took = broker, seconds, None
        qbroker.Listener(broker.list_key)  # bound before the test sends anything

    def run(self):
        t0 = time.monotonic()
        self.broker._wait(self.seconds)
        self.took = time.monotonic() - t0


def test_it_wakes_the_queues_pusher_when_a_task_is_queued(data_dir, django_capture_on_commit_callbacks):
    pusher, other = qbroker.WakeableORM("mig-test"), qbroker.WakeableORM("other-test")
    waiting, sleeping = Waiting(pusher, 60), Waiting(other, 60)
    waiting.start()
    sleeping.start()
    assert oct(os.stat(data_dir / "qwake").st_mode & 0o777) == "0o700"
    waiting.join(0.5)
    assert waiting.is_alive()  # nothing queued: it waits
    with django_capture_on_commit_callbacks(execute=True) as sent:
        qbroker.WakeableORM("mig-test").enqueue("payload")  # another process's broker, same queue
        waiting.join(0.5)
        assert waiting.is_alive()  # not woken before the row is committed
    assert len(sent) == 1
    waiting.join(30)  # a loaded machine: anything well under the 60 s poll proves the wake
    assert waiting.took is not None and waiting.took < 30
    assert sleeping.is_alive()  # another queue: no wake-up
    assert [payload for _pk, payload in pusher.dequeue() or []] == ["payload"]
    qbroker.wake("other-test")
    sleeping.join(30)
    assert sleeping.took is not None and sleeping.took < 30


def test_it_removes_the_socket_of_a_pusher_that_is_gone(data_dir):
    (data_dir / "qwake").mkdir(mode=0o700)
    dead = data_dir / "qwake" / "mig-test.999999"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(dead))  # closed without unlinking: what a killed pusher leaves
    assert qbroker.wake("mig-test") == 0
    assert not dead.exists()


class Worker:
    """A worker of the cluster as its busy file shows it (qbroker.working): its start
    count, under an exclusive flock while it runs a task (a flock of another open file
    description conflicts in one process too)."""

    def __init__(self, data_dir, pid):
        (data_dir / "qbusy").mkdir(mode=0o700, exist_ok=True)
        self.fd = os.open(
            data_dir / "qbusy" / f"migrations.{qbroker.cluster_id()}.{pid}", os.O_RDWR | os.O_CREAT
        )
        self.count = 0

    def start(self):
        self.count += 1
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.pwrite(self.fd, str(self.count).encode(), 0)

    def end(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def test_it_takes_a_migration_only_for_a_free_worker_of_its_own_cluster(data_dir, monkeypatch):
    """Two workers: the pusher takes two tasks, none while both run (or are about to
    start one it handed out: it waits for that start), and one as soon as one ends.
    Another queue's pusher takes what it can, as django-q2's does."""
    monkeypatch.setattr(qbroker.Conf, "WORKERS", 2)
    monkeypatch.setattr(qbroker.Conf, "POLL", 0.01)
    pusher = qbroker.WakeableORM("migrations")
    for n in range(4):
        pusher.enqueue(f"job {n}")
    first, second = Worker(data_dir, 101), Worker(data_dir, 102)
    assert [p for _pk, p in pusher.dequeue()] == ["job 0"]
    assert [p for _pk, p in pusher.dequeue()] == ["job 1"]  # a second worker is free
    first.start()
    second.start()
    assert pusher.dequeue() is None  # both run: the others wait in the table
    assert qbroker.workers_of("migrations", qbroker.cluster_id()) == (2, 2)
    assert qbroker.workers_of("migrations", qbroker.cluster_id() + 1) == (0, 0)  # another cluster's
    first.end()
    assert [p for _pk, p in pusher.dequeue()] == ["job 2"]
    threading.Timer(0.2, first.start).start()  # a worker takes job 2 from the local queue
    t0 = time.monotonic()
    assert pusher.dequeue() is None  # full once job 2 starts: it waited for that start
    assert time.monotonic() - t0 >= 0.15
    second.end()
    assert [p for _pk, p in pusher.dequeue()] == ["job 3"]

    other = qbroker.WakeableORM("other-test")
    for n in range(3):
        other.enqueue(f"sync {n}")
    taken = [other.dequeue() for _ in range(3)]
    assert [p for batch in taken for _pk, p in batch] == ["sync 0", "sync 1", "sync 2"]


def test_it_forgets_a_task_no_worker_started(data_dir, monkeypatch):
    """A worker killed as it took the task never starts it: after START_WAIT_SECONDS the
    pusher no longer keeps a place for it."""
    monkeypatch.setattr(qbroker.Conf, "WORKERS", 1)
    monkeypatch.setattr(qbroker, "START_WAIT_SECONDS", 0.05)
    pusher = qbroker.WakeableORM("migrations")
    pusher.enqueue("job 0")
    pusher.enqueue("job 1")
    assert [p for _pk, p in pusher.dequeue()] == ["job 0"]
    assert [p for _pk, p in pusher.dequeue()] == ["job 1"]


def test_it_marks_a_migrations_worker_busy_while_its_task_runs(data_dir):
    cluster = qbroker.cluster_id()
    with qbroker.working("migrations"):
        assert qbroker.workers_of("migrations", cluster) == (1, 1)
    assert qbroker.workers_of("migrations", cluster) == (0, 1)
    with qbroker.working("migrations"):
        assert qbroker.workers_of("migrations", cluster) == (1, 2)
    with qbroker.working("kvmweb"):  # the default cluster's tasks are not counted
        pass
    assert sorted(p.name.split(".")[0] for p in (data_dir / "qbusy").iterdir()) == ["migrations"]
    assert oct((data_dir / "qbusy").stat().st_mode & 0o777) == "0o700"


def test_it_removes_the_busy_files_of_a_cluster_that_is_gone(data_dir):
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    (data_dir / "qbusy").mkdir(mode=0o700)
    (data_dir / "qbusy" / f"migrations.{gone}.7").write_text("3")
    (data_dir / "qbusy" / f"migrations.{qbroker.cluster_id()}.8").write_text("1")
    assert qbroker.WakeableORM("migrations")._free_workers() is not None
    assert [p.name for p in (data_dir / "qbusy").iterdir()] == [f"migrations.{qbroker.cluster_id()}.8"]

"""kvmweb/qbroker.py: a task queued on this machine wakes the queue's pusher at once
instead of its next poll; other queues' pushers sleep on; a socket left by a killed
pusher is removed by the next sender."""

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

"""Live updates through a real daphne (`python -m kvmweb.serve`, as scripts/run.sh starts
it): the job hub frames each update once and writes the bytes to every watcher's socket
(kvmweb/handshake.py FrameWriter); the frames must be exactly what autobahn would have
sent, and a socket the writer cannot use falls back to the ASGI send."""

import asyncio
import struct
from collections import deque

import pytest

from kvmweb.handshake import FrameWriter, text_frame
from tests.scaleout.wsclient import WebSocket
from tests.sites import Site

SETUP = """
import uuid
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone
from hosts.models import VM, Host
from migrations_app.models import MigrationJob
user = User.objects.create_superuser("watcher", password="a long enough passphrase 42")
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
src = Host.objects.create(name="src", uri="test:///src")
dst = Host.objects.create(name="dst", uri="test:///dst")
vm = VM.objects.create(uuid=uuid.uuid4(), name="framed-vm", host=src)
job = MigrationJob.objects.create(
    vm=vm, vm_name=vm.name, source=src, source_name="src", target=dst, target_name="dst",
    mode=MigrationJob.LIVE, status=MigrationJob.RUNNING, started_at=timezone.now(), phase="memory",
)
import json
print(json.dumps([session.session_key, job.pk]))
"""
WRITE = """
from django.db.models import F
from migrations_app.models import MigrationJob
MigrationJob.objects.filter(pk={job}).update(percent={percent}, progress_seq=F("progress_seq") + 1)
"""


def decode(frame):
    """(fin, opcode, payload) of one unmasked server frame; the whole of ``frame``."""
    b1, b2 = frame[0], frame[1]
    n, pos = b2 & 0x7F, 2
    if n == 126:
        (n,), pos = struct.unpack("!H", frame[2:4]), 4
    elif n == 127:
        (n,), pos = struct.unpack("!Q", frame[2:10]), 10
    assert not b2 & 0x80 and len(frame) == pos + n
    return bool(b1 & 0x80), b1 & 0x0F, frame[pos:].decode()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_it_frames_a_text_as_rfc_6455_says(size):
    text = ("中" * (size // 3)).ljust(size, "x")
    assert decode(text_frame(text)) == (True, 0x1, text)


def test_it_writes_only_to_an_open_idle_socket():
    class Transport:
        def __init__(self):
            self.written = []

        def write(self, data):
            self.written.append(data)

    class Protocol:  # the attributes autobahn's WebSocketServerProtocol has
        STATE_OPEN, STATE_CLOSING, SEND_STATE_GROUND, SEND_STATE_INSIDE_MESSAGE = 1, 2, 0, 3
        websocket_extensions_in_use = []

        def __init__(self):
            self.transport, self.state, self.send_state, self.send_queue = Transport(), 1, 0, deque()

        def handle_reply(self, message):
            pass

    async def handle_reply(protocol, message):
        pass

    from functools import partial

    protocol = Protocol()
    writer = FrameWriter.for_send(partial(handle_reply, protocol))
    assert FrameWriter.for_send(lambda message: None) is None  # not daphne: ASGI sends only
    assert writer(b"frame") and protocol.transport.written == [b"frame"]
    for change in (
        {"state": Protocol.STATE_CLOSING},
        {"send_queue": deque([(b"queued", False)])},
        {"send_state": Protocol.SEND_STATE_INSIDE_MESSAGE},
        {"websocket_extensions_in_use": ["permessage-deflate"]},
        {"transport": None},
    ):
        other = Protocol()
        other.__dict__.update(change)
        assert FrameWriter(other)(b"frame") is False, change
        assert other.transport is None or other.transport.written == []


@pytest.fixture(scope="module")
def daphne(tmp_path_factory):
    """A real daphne (tests/sites.py) with a signed-in watcher and a running job."""
    site = Site(tmp_path_factory.mktemp("framed"))
    session, job = site.python(SETUP)
    site.start_web(timeout=180)  # a backstop: a loaded machine starts daphne slowly

    def write(percent):
        site.python(WRITE.format(job=job, percent=percent))

    yield type(
        "Daphne", (), {"port": site.port, "session": session, "job": job, "write": staticmethod(write)}
    )
    site.stop()


def test_it_delivers_framed_updates_through_daphne(daphne):
    async def run():
        sockets = [
            await WebSocket.connect(
                "127.0.0.1",
                daphne.port,
                f"/ws/jobs/{daphne.job}/",
                cookies={"sessionid": daphne.session},
                timeout=30,
            )
            for _ in range(3)
        ]
        for ws in sockets:
            assert f'id="job-progress-{daphne.job}"' in await asyncio.wait_for(ws.recv(), 30)
        await asyncio.to_thread(daphne.write, 66.6)
        for ws in sockets:
            while True:  # the update, whole and parseable (the poller may send a tick first)
                text = await asyncio.wait_for(ws.recv(), 30)
                if "66.6 %" in text:
                    assert text.count('id="job-progress-') == 1 and text.rstrip().endswith("</div>")
                    break
        for ws in sockets:
            await ws.close()

    asyncio.run(run())

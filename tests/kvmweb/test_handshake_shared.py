"""Handshakes share what they may share (kvmweb/handshake.py): identical lookups waiting
together for the WebSockets' DB thread run once, and a ready-made frame goes out with one
send when the socket has nothing buffered."""

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from twisted.internet import tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol

from kvmweb.handshake import Shared, _send_now


class Gate:
    """A call that blocks the executor thread until released (a slow lookup)."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, value):
        self.started.set()
        assert self.release.wait(30)
        return value


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


@pytest.mark.asyncio
async def test_it_runs_identical_queued_calls_once_and_never_joins_a_started_one(executor):
    shared = Shared(executor)
    runs = []

    def lookup(value):
        runs.append(value)
        return {"value": value}

    blocker = Gate()
    first = asyncio.ensure_future(shared("block", blocker, "b"))  # occupies the thread
    await asyncio.to_thread(blocker.started.wait, 30)
    # Queued behind it, not started: the same key is one call, another key its own.
    waiting = [asyncio.ensure_future(shared("session-a", lookup, "a")) for _ in range(5)]
    other = asyncio.ensure_future(shared("session-b", lookup, "b"))
    await asyncio.sleep(0)
    blocker.release.set()
    results = await asyncio.wait_for(asyncio.gather(*waiting), 30)
    assert await asyncio.wait_for(other, 30) == {"value": "b"}
    assert await first == "b"
    assert sorted(runs) == ["a", "b"]
    assert all(r is results[0] for r in results)
    assert shared.joined == 4

    # A call that has started is not joined: a newcomer gets a read of its own.
    slow = Gate()
    started = asyncio.ensure_future(shared("session-a", slow, "old"))
    await asyncio.to_thread(slow.started.wait, 30)
    late = asyncio.ensure_future(shared("session-a", lookup, "new"))
    slow.release.set()
    assert await asyncio.wait_for(started, 30) == "old"
    assert await asyncio.wait_for(late, 30) == {"value": "new"}
    assert shared.queued == {}


@pytest.mark.asyncio
async def test_it_keeps_the_call_for_the_others_when_one_waiter_gives_up(executor):
    shared = Shared(executor)
    blocker = Gate()
    busy = asyncio.ensure_future(shared("block", blocker, None))
    await asyncio.to_thread(blocker.started.wait, 30)
    gives_up = asyncio.ensure_future(
        shared(
            "k",
            lambda: "user",
        )
    )
    stays = asyncio.ensure_future(shared("k", lambda: "user"))
    await asyncio.sleep(0)
    gives_up.cancel()
    blocker.release.set()
    assert await asyncio.wait_for(stays, 30) == "user"
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    await busy


class Transport(tcp.Connection):
    """A Twisted TCP transport (not registered with a reactor) with the attributes that
    _send_now reads."""

    TLS = False
    connected = True
    disconnecting = False
    _writeDisconnected = False

    def __init__(self, sock):
        self.socket = sock
        self._tempDataBuffer = []
        self.dataBuffer = b""
        self.offset = 0


def test_it_sends_a_frame_at_once_only_when_nothing_is_buffered():
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        transport = Transport(a)
        assert _send_now(transport, b"frame") == 5
        assert b.recv(100) == b"frame"
        for change in (
            {"_tempDataBuffer": [b"101 Switching Protocols"]},  # written, not yet flushed
            {"dataBuffer": b"pending", "offset": 2},
            {"TLS": True},
            {"disconnecting": True},
            {"connected": False},
            {"socket": None},
        ):
            other = Transport(a)
            other.__dict__.update(change)
            assert _send_now(other, b"frame") == 0, change
        # A full socket takes part of it (or nothing): the caller writes the rest after.
        big = b"x" * (8 << 20)
        sent = _send_now(transport, big)
        assert 0 <= sent < len(big)
    finally:
        a.close()
        b.close()
    assert _send_now(Transport(a), b"frame") == 0  # closed: no exception


def test_it_never_sends_around_a_tls_wrapper():
    """daphne with an ``ssl:`` endpoint: the WebSocket's transport is Twisted's TLS
    wrapper, which passes ``socket``, ``TLS`` (False) and the buffer attributes on to the
    TCP transport below it. A frame sent on that socket would go out in clear text, in the
    middle of the TLS stream: it must go through the wrapper's write instead."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.setblocking(False)
        tls = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)  # as makeConnection leaves it
        tls.transport, tls.connected = Transport(a), 1
        assert tls.socket is a and tls.TLS is False  # what a look at attributes would see
        assert _send_now(tls, b"plain text") == 0
        with pytest.raises(BlockingIOError):
            b.recv(100)  # nothing went out on the raw socket
    finally:
        a.close()
        b.close()

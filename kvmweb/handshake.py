"""A bound on WebSocket handshakes in progress in one daphne process.

Every handshake makes sync database calls before it is accepted (channels' session and
user lookups) and one after (the consumer's snapshot); channels runs them all on ONE
thread, first come first served. When a thousand browsers reconnect at once (a daphne
restart with that many job pages open), each handshake's first call is queued before any
handshake's second: nobody was accepted before daphne's connect timeout and all 1,000
were dropped together (benchmarks/progress_latency.py --at-once). ``HandshakeGate`` lets
KVMWEB_WS_HANDSHAKE_CONCURRENCY handshakes run their calls at a time and the others wait
their turn, so handshakes complete one after another at the rate the process can serve
them; one that waits past the connect timeout is dropped as before and its browser
reconnects.

Handshakes waiting together share what they may (``Shared``): the handshakes of one
session share one session and user lookup, and (migrations_app/streaming.py) those of
one user and job one snapshot read; only a call that has not started is joined. With a
thousand pages of one job reconnecting at once this (with the snapshot sent as one
cached frame) took daphne's CPU per handshake from 12.3 to 1.5 ms on PostgreSQL + Redis
and from 5.8 to 1.8 ms on the embedded default (benchmarks/progress_latency.py
--at-once, two CPU-bound processes beside it, load ~10).

The gate also puts a ``FrameWriter`` for daphne's socket into the scope
(``kvmweb_frame_writer``): live updates write one ready-made frame to many sockets.

A handshake holds its place until the application accepts or closes the socket (or the
application ends); open sockets never hold one. A handshake that waited longer than the
connect timeout kvmweb.serve gives daphne (KVMWEB_REQUEST_TIMEOUT) was already dropped by
daphne: it is not run at all, so its lookups do not delay the ones still waiting.
"""

import asyncio
import functools
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from channels.auth import AuthMiddleware, get_user
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.db import DatabaseError, connections

# The WebSockets' sync database work runs on two threads of their own that keep their
# connections open: one for the handshakes' session and user lookups, one for the live
# job pollers' reads and the job snapshots (ws_db). channels' database_sync_to_async opens
# and closes a connection around every call (CONN_MAX_AGE=0): a thousand reconnecting
# pages cost a thousand SQLite opens with their PRAGMAs, or on PostgreSQL a thousand
# logins. Two threads, not one: a handshake's lookup must not queue behind the snapshots
# of the sockets accepted before it (with a thousand arriving at once, those that waited
# past daphne's connect timeout were dropped). A connection is closed on any database
# error (a restarted server: the next call reconnects) and by close_ws_db() (the job hub
# calls it when its last poller stops; tests).
_db_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmweb-ws-db")
_auth_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmweb-ws-auth")


def _on_db_thread(fn, *args):
    try:
        return fn(*args)
    except DatabaseError:
        connections.close_all()
        raise


async def _run_on(executor, fn, *args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(_on_db_thread, fn, *args))


async def ws_db(fn, *args):
    """Run sync DB code ``fn(*args)`` on the WebSockets' DB thread (never on the loop)."""
    return await _run_on(_db_executor, fn, *args)


class Shared:
    """Identical calls waiting for one executor thread, run once.

    ``await shared(key, fn, *args)`` queues ``fn(*args)`` on the thread unless a call
    with the same ``key`` is queued there and has not started yet: then it waits for
    that call's result instead. A call that has started is never joined, so whoever
    joins a call asked before its database reads began (a watcher that subscribed
    first gets a snapshot read after it subscribed). When a thousand pages reconnect at
    once, the handshakes of one session wait together behind the ones before them and
    are served by one lookup instead of one each. Each caller waits through a shield:
    one handshake given up does not cancel the call for the others."""

    def __init__(self, executor):
        self.executor = executor
        self.queued = {}  # (event loop, key) -> [asyncio future or None]
        self.calls = self.joined = 0  # (tests)

    async def __call__(self, key, fn, *args):
        loop = asyncio.get_running_loop()
        k = (id(loop), key)
        entry = self.queued.get(k)
        if entry is not None and entry[0] is not None:
            self.joined += 1
            return await asyncio.shield(entry[0])
        entry = [None]
        self.queued[k] = entry  # before the thread can start it (no await in between)

        def run():
            # Started: from now on a newcomer queues a call of its own. A dict
            # operation, atomic under the GIL; the loop only adds a missing key.
            if self.queued.get(k) is entry:
                del self.queued[k]
            return _on_db_thread(fn, *args)

        entry[0] = future = loop.run_in_executor(self.executor, run)
        future.add_done_callback(lambda _f: self.queued.get(k) is entry and self.queued.pop(k, None))
        self.calls += 1
        return await asyncio.shield(future)


shared_ws_db = Shared(_db_executor)
_shared_auth = Shared(_auth_executor)


async def close_ws_db():
    """Close both threads' connections (they reopen on the next call)."""
    await _run_on(_db_executor, connections.close_all)
    await _run_on(_auth_executor, connections.close_all)


class SessionAuthMiddleware(AuthMiddleware):
    """channels' AuthMiddleware (the same ``get_user``: session, backend, session hash,
    inactive users refused) with the lookup on the handshakes' DB thread."""

    async def resolve_scope(self, scope):
        # Handshakes of one session waiting together share one lookup (Shared): the
        # same session row read at the same moment gives the same user.
        key = getattr(scope.get("session"), "session_key", None)
        if key:
            user = await _shared_auth(("session", key), get_user.func, scope)
        else:
            user = await _run_on(_auth_executor, get_user.func, scope)
        scope["user"]._wrapped = user


def SessionAuthStack(inner):  # noqa: N802 (named like channels' AuthMiddlewareStack)
    """Cookies, session and user for a WebSocket, as channels' AuthMiddlewareStack."""
    return CookieMiddleware(SessionMiddleware(SessionAuthMiddleware(inner)))


def text_frame(text):
    """One unfragmented, unmasked WebSocket text frame (RFC 6455 5.2) carrying ``text``:
    what a server writes, the same bytes for every socket."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 1 << 16:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


class FrameWriter:
    """Writes a ready-made text frame straight to one daphne WebSocket's socket.

    Sending a message through the ASGI stack costs, per socket, the consumer's send,
    every middleware's wrapper, daphne's checks, the UTF-8 encoding and autobahn's
    framing; a live update to 1,000 watchers of one job paid that 1,000 times for the
    same text. The job hub frames the text once (``text_frame``) and hands the bytes to
    each socket: exactly what autobahn's sendMessage ends in for a message that is not
    compressed or fragmented. Only then: an open socket, nothing queued by autobahn, no
    extension negotiated (daphne enables none), not inside a fragmented message.
    Otherwise ``__call__`` returns False and the caller sends through ASGI.

    Twisted's ``transport.write`` only buffers: the bytes go out when the reactor next
    finds the socket writable, which costs a selector registration, a callback and a
    deregistration per socket and update (a third of daphne's CPU with 1,000 watchers
    at four updates a second). When nothing of the socket's own is buffered (plain TCP
    or UNIX socket, no TLS inside Twisted), the frame is sent at once with one
    non-blocking ``send``; whatever the kernel did not take is handed to
    ``transport.write``, which sends it after, in order."""

    __slots__ = ("protocol",)

    def __init__(self, protocol):
        self.protocol = protocol

    @classmethod
    def for_send(cls, send):
        """A writer for daphne's ASGI ``send`` (a partial of Server.handle_reply bound to
        the autobahn protocol), or None for any other server (tests, uvicorn)."""
        protocol = next(iter(getattr(send, "args", ()) or ()), None)
        needed = ("transport", "state", "STATE_OPEN", "send_queue", "send_state", "SEND_STATE_GROUND")
        if protocol is None or not all(hasattr(protocol, name) for name in needed):
            return None
        return cls(protocol)

    def __call__(self, frame):
        p = self.protocol
        t = p.transport
        if (
            p.state != p.STATE_OPEN
            or p.send_queue
            or p.send_state != p.SEND_STATE_GROUND
            or getattr(p, "websocket_extensions_in_use", None)
            or t is None
        ):
            return False
        sent = _send_now(t, frame)
        if sent < len(frame):
            t.write(frame[sent:] if sent else frame)
        return True


_plain_transports = None


def _is_plain_socket_transport(transport):
    """True for Twisted's own TCP and UNIX socket transports (tcp.Server, unix.Server and
    their subclasses), nothing else. Not a look at attributes: a wrapper such as the TLS
    one daphne uses for an ``ssl:`` endpoint (twisted.protocols.tls, a ProtocolWrapper)
    passes every attribute it lacks on to the TCP transport below it, ``socket`` and
    ``TLS = False`` included: a frame sent on that socket would bypass the encryption."""
    global _plain_transports
    if _plain_transports is None:
        from twisted.internet import tcp  # here: the reactor is daphne's to install

        _plain_transports = (tcp.Connection,)
    return isinstance(transport, _plain_transports)


def _send_now(transport, data):
    """Bytes of ``data`` sent at once on the socket of Twisted ``transport`` (0 when it
    is not a plain socket transport with an empty buffer, or the socket is full or
    broken: the caller hands the rest to ``transport.write``, which reports a broken
    connection the usual way)."""
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or not _is_plain_socket_transport(transport)
        or getattr(transport, "TLS", True)
        or not getattr(transport, "connected", False)
        or getattr(transport, "disconnecting", True)
        or getattr(transport, "_writeDisconnected", True)
        or getattr(transport, "_tempDataBuffer", True)
        or getattr(transport, "offset", None) != len(getattr(transport, "dataBuffer", b"x"))
    ):
        return 0
    try:
        return sock.send(data)
    except OSError:  # full (EAGAIN), interrupted, or gone
        return 0


class HandshakeGate:
    """ASGI middleware for the websocket stack: at most ``limit`` handshakes of this
    event loop run inside the wrapped application at a time."""

    def __init__(self, app, limit=None):
        self.app = app
        self.limit = limit
        self._semaphores = weakref.WeakKeyDictionary()  # per event loop (tests run many)
        self.peak = 0  # most handshakes inside at once (tests)
        self.dropped = 0  # handshakes not run: they waited past the connect timeout
        self._inside = 0

    def _semaphore(self):
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            limit = self.limit or settings.KVMWEB_WS_HANDSHAKE_CONCURRENCY
            semaphore = self._semaphores[loop] = asyncio.Semaphore(limit)
        return semaphore

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "websocket":
            return await self.app(scope, receive, send)
        semaphore = self._semaphore()
        queued = time.monotonic()
        await semaphore.acquire()
        if time.monotonic() - queued >= settings.KVMWEB_REQUEST_TIMEOUT:
            semaphore.release()  # daphne gave up on this one meanwhile; the browser retries
            self.dropped += 1
            return None
        self._inside += 1
        self.peak = max(self.peak, self._inside)
        held = True

        def release():
            nonlocal held
            if held:
                held = False
                self._inside -= 1
                semaphore.release()

        async def gated_send(message):
            if message.get("type") in (
                "websocket.accept",
                "websocket.close",
                "websocket.http.response.start",
            ):
                release()  # the handshake is over (accepted or refused)
            await send(message)

        writer = FrameWriter.for_send(send)
        if writer is not None:
            scope = dict(scope, kvmweb_frame_writer=writer)
        try:
            return await self.app(scope, receive, gated_send)
        finally:
            release()

"""WebSocket handshakes are admitted a few at a time (kvmweb/handshake.py): a crowd
reconnecting at once is served in turn instead of every handshake's lookups being queued
behind everyone else's."""

import asyncio

import pytest

from kvmweb.asgi import application
from kvmweb.handshake import HandshakeGate


class SlowHandshake:
    """An inner application whose handshake takes a while before it accepts."""

    def __init__(self):
        self.inside = 0
        self.peak = 0
        self.accepted = []

    async def __call__(self, scope, receive, send):
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await asyncio.sleep(0.01)  # the session and user lookups
        self.inside -= 1
        self.accepted.append(scope["n"])
        await send({"type": "websocket.accept"})
        await asyncio.sleep(0.05)  # an open socket: holds no place
        await send({"type": "websocket.close", "code": 1000})


async def _noop_send(message):
    pass


async def _receive():
    return {"type": "websocket.connect"}


@pytest.mark.asyncio
async def test_it_runs_at_most_the_limit_of_handshakes_at_once_and_serves_all_in_order():
    inner = SlowHandshake()
    gate = HandshakeGate(inner, limit=3)
    await asyncio.wait_for(
        asyncio.gather(*(gate({"type": "websocket", "n": n}, _receive, _noop_send) for n in range(20))), 30
    )
    assert inner.peak == gate.peak == 3
    assert inner.accepted == list(range(20))  # first come, first accepted


@pytest.mark.asyncio
async def test_it_frees_the_place_when_the_application_fails_or_closes_without_accepting():
    calls = []

    async def refuses(scope, receive, send):
        calls.append(scope["n"])
        if scope["n"] % 2:
            raise RuntimeError("lookup failed")
        await send({"type": "websocket.close", "code": 4401})

    gate = HandshakeGate(refuses, limit=1)
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(gate({"type": "websocket", "n": n}, _receive, _noop_send) for n in range(6)),
            return_exceptions=True,
        ),
        30,
    )
    assert calls == list(range(6))
    assert [isinstance(o, RuntimeError) for o in outcomes] == [False, True] * 3


@pytest.mark.asyncio
async def test_it_skips_a_handshake_that_waited_past_the_connect_timeout(settings):
    settings.KVMWEB_REQUEST_TIMEOUT = 0.05
    inner = SlowHandshake()
    gate = HandshakeGate(inner, limit=1)

    async def blocks(scope, receive, send):
        await asyncio.sleep(0.2)  # longer than the timeout: the next one gives up

    gate.app = blocks
    first = asyncio.ensure_future(gate({"type": "websocket", "n": 0}, _receive, _noop_send))
    await asyncio.sleep(0)
    gate.app = inner
    await asyncio.wait_for(gate({"type": "websocket", "n": 1}, _receive, _noop_send), 30)
    await first
    assert gate.dropped == 1 and inner.accepted == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["http", "lifespan"])
async def test_it_leaves_other_connections_alone(kind):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    gate = HandshakeGate(app, limit=1)
    gate._semaphore = None  # would fail if it were used
    await gate({"type": kind}, _receive, _noop_send)
    assert seen == [kind]


def test_it_gates_the_sites_websocket_stack():
    stack = application.application_mapping["websocket"]
    found = []
    while stack is not None and not found:
        if isinstance(stack, HandshakeGate):
            found.append(stack)
        stack = getattr(stack, "app", None) or getattr(stack, "inner", None)
    assert found

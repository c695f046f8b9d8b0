"""A minimal asyncio WebSocket client (RFC 6455) for the scale-out tests and benchmarks.

Enough for watching kvmweb's job streams: the opening handshake with cookies and an
Origin, reading text frames the server sends (unmasked, possibly fragmented), answering
pings, and a clean close. No extensions, no compression. Written here rather than adding
a dependency: the needs are small and the benchmark opens hundreds of them at once.
"""

import asyncio
import base64
import hashlib
import os
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(Exception):
    """The server did not switch protocols (status line included)."""


class Closed(Exception):
    """The server closed the connection; ``code`` is its close code (None if none)."""

    def __init__(self, code=None):
        super().__init__(f"closed by server (code {code})")
        self.code = code


def _frame(opcode, payload=b""):
    """A masked client frame (clients must mask)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class WebSocket:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.close_code = None

    @classmethod
    async def connect(
        cls, host, port, path, *, cookies=None, origin=None, timeout=10.0, ssl=None, host_header=None
    ):
        """Open a WebSocket; ``ssl`` is an SSLContext for wss:// (e.g. through nginx)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl, server_hostname=host_header if ssl else None),
            timeout,
        )
        key = base64.b64encode(os.urandom(16)).decode()
        host_header = host_header or f"{host}:{port}"
        headers = [
            f"GET {path} HTTP/1.1",
            f"Host: {host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Origin: {origin or f'http://{host_header}'}",
        ]
        if cookies:
            headers.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()))
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = response.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status + " ":
            writer.close()
            raise HandshakeError(status)
        expected = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        if expected not in response:
            writer.close()
            raise HandshakeError("bad Sec-WebSocket-Accept")
        return cls(reader, writer)

    async def _read_frame(self):
        b1, b2 = await self.reader.readexactly(2)
        fin, opcode, n = b1 & 0x80, b1 & 0x0F, b2 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        mask = await self.reader.readexactly(4) if b2 & 0x80 else None
        payload = await self.reader.readexactly(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(fin), opcode, payload

    async def recv(self):
        """The next text (or binary) message; raises Closed when the server closes."""
        parts, kind = [], None
        while True:
            try:
                fin, opcode, payload = await self._read_frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                raise Closed(self.close_code) from None
            if opcode == OP_PING:
                self.writer.write(_frame(OP_PONG, payload))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                try:
                    self.writer.write(_frame(OP_CLOSE, payload[:2]))
                    await self.writer.drain()
                except ConnectionError:
                    pass
                self.writer.close()
                raise Closed(self.close_code)
            if opcode in (OP_TEXT, OP_BINARY):
                kind, parts = opcode, [payload]
            elif opcode == OP_CONT:
                parts.append(payload)
            if fin:
                data = b"".join(parts)
                return data.decode() if kind == OP_TEXT else data

    async def close(self, code=1000):
        try:
            self.writer.write(_frame(OP_CLOSE, struct.pack("!H", code)))
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError, OSError):
            pass

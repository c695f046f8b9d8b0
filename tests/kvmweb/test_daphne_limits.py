"""Request limits and WebSocket origins, proven against a real daphne process started the
way scripts/run.sh starts it (`python -m kvmweb.serve`), on a loopback port:

- a 60 MiB POST is answered 413 before daphne buffers it (its peak memory barely moves),
  by Content-Length and by counting a chunked body;
- a request whose headers trickle in, or a connection that sends nothing, is closed
  after KVMWEB_REQUEST_TIMEOUT;
- a WebSocket message over KVMWEB_WS_MAX_MESSAGE_BYTES closes the socket (1009);
- a WebSocket is accepted only from the site's exact origin (scheme, host, port) or a
  trusted origin; a path that matches no route closes with 4404, no traceback.
"""

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.scaleout.wsclient import Closed, HandshakeError, WebSocket, _frame

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 3  # KVMWEB_REQUEST_TIMEOUT of the daphne under test
TRUSTED = "https://kvmweb.example.test"
SESSION = """
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
user = User.objects.create_user("watcher", password="a long enough passphrase 42")
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
print(session.session_key)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("limits")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "KVMWEB_SQLITE_PATH", "DJANGO_SETTINGS_MODULE")
    }
    env.update(
        KVMWEB_DATA_DIR=str(data),
        KVMWEB_REQUEST_TIMEOUT=str(TIMEOUT),
        KVMWEB_CSRF_TRUSTED_ORIGINS=TRUSTED,
        PYTHONUNBUFFERED="1",
    )
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
    session = subprocess.run(
        [*manage, "shell", "-c", SESSION],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    port = _free_port()
    log = (data / "daphne.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmweb.serve", "-b", "127.0.0.1", "-p", str(port), "kvmweb.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180  # a backstop: a loaded machine starts daphne slowly
    while True:
        assert proc.poll() is None, (data / "daphne.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "daphne did not listen within 180 s"
            time.sleep(0.1)
    server = type(
        "Server", (), {"port": port, "pid": proc.pid, "session": session, "log": data / "daphne.log"}
    )
    yield server
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _post_body(port, head, chunks):
    """Send ``head`` then body chunks until the server answers or closes; returns
    (bytes of body sent, response text)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.settimeout(0.001)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError, BlockingIOError):
                break
            sent += len(chunk)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered
            except (BlockingIOError, TimeoutError):
                pass
            except ConnectionResetError:
                break
        sock.settimeout(30)
        try:
            response = sock.recv(4096).decode(errors="replace")
        except ConnectionResetError:
            response = ""
    return sent, response


def test_it_refuses_a_60_mib_body_before_buffering_it(server):
    size = 60 * 1024 * 1024
    head = (
        f"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    before = _peak_rss_kib(server.pid)
    sent, response = _post_body(server.port, head, (b"a" * 65536 for _ in range(size // 65536)))
    grown = _peak_rss_kib(server.pid) - before
    assert response.startswith("HTTP/1.1 413 "), response[:200]
    assert sent < 16 * 1024 * 1024, f"{sent} bytes accepted before the refusal"
    assert grown < 16 * 1024, f"daphne's peak memory grew by {grown} KiB"


def test_it_refuses_a_chunked_body_once_it_passes_the_limit(server):
    head = (
        f"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"a" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    before = _peak_rss_kib(server.pid)
    sent, response = _post_body(server.port, head, (chunk for _ in range(960)))  # 60 MiB
    grown = _peak_rss_kib(server.pid) - before
    assert response.startswith("HTTP/1.1 413 "), response[:200]
    assert sent < 16 * 1024 * 1024 and grown < 16 * 1024, (sent, grown)


def test_it_still_serves_requests_under_the_limit(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 ") and b"Content-Security-Policy" in response


def test_it_closes_slow_and_silent_connections(server):
    """Twenty connections trickle one header byte every 0.3 s (each byte would restart an
    idle timeout); five send nothing. All are closed soon after the request deadline."""
    request = f"GET /login/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Slow: {'x' * 200}\r\n\r\n".encode()
    start = time.monotonic()  # before connecting: no deadline can start earlier
    trickling = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(20)]
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(5)]
    closed_after = {}
    try:
        for sock in trickling + silent:
            sock.setblocking(False)
        position = 0
        while len(closed_after) < len(trickling) + len(silent) and time.monotonic() - start < TIMEOUT + 30:
            for sock in trickling:
                if sock not in closed_after:
                    try:
                        sock.send(request[position : position + 1])
                    except OSError:
                        closed_after[sock] = time.monotonic() - start
            position += 1
            time.sleep(0.3)
            for sock in trickling + silent:
                if sock in closed_after:
                    continue
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed_after[sock] = time.monotonic() - start
    finally:
        for sock in trickling + silent:
            sock.close()
    assert len(closed_after) == 25, f"{25 - len(closed_after)} connections still open after {TIMEOUT + 30} s"
    assert position < len(request), "a trickled request was completed: the test proves nothing"
    assert min(closed_after.values()) >= TIMEOUT - 0.5
    assert max(closed_after.values()) < TIMEOUT + 15, sorted(closed_after.values())


def _ws(server, path="/ws/jobs/", origin=None, host=None, cookies=True):
    return WebSocket.connect(
        "127.0.0.1",
        server.port,
        path,
        origin=origin,
        host_header=host,
        cookies={"sessionid": server.session} if cookies else None,
        timeout=30,
    )


@pytest.mark.parametrize(
    "origin, host",
    [
        ("http://127.0.0.1:{port}", None),  # the site's own origin
        (TRUSTED, None),  # KVMWEB_CSRF_TRUSTED_ORIGINS
        ("http://localhost:{port}", "localhost:{port}"),  # own origin under another allowed name
    ],
)
def test_it_accepts_a_websocket_from_the_exact_origin(server, origin, host):
    async def run():
        ws = await _ws(
            server, origin=origin.format(port=server.port), host=host and host.format(port=server.port)
        )
        await ws.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "origin, host",
    [
        ("http://localhost:9999", None),  # another port on an allowed host name
        ("http://127.0.0.1:9999", None),
        ("https://127.0.0.1:{port}", None),  # another scheme
        ("http://localhost:{port}", None),  # another host than the one asked for
        ("http://127.0.0.1:{port}.evil.example", None),
        ("https://kvmweb.example.test:8443", None),  # the trusted host, another port
        ("null", None),
        ("", None),
        ("http://evil.example:{port}", "evil.example:{port}"),  # a Host outside ALLOWED_HOSTS
    ],
)
def test_it_refuses_a_websocket_from_any_other_origin(server, origin, host):
    async def run():
        with pytest.raises(
            HandshakeError, match=r" 40[03] "
        ):  # refused (daphne itself answers 400 to a malformed Origin)
            await _ws(
                server,
                origin=origin.format(port=server.port) or " ",
                host=host and host.format(port=server.port),
            )

    asyncio.run(run())


@pytest.mark.parametrize("path", ["/ws/jobs/abc/", "/ws/jobs/99999999999999999999999/", "/ws/nothing/"])
def test_it_closes_a_malformed_socket_path_cleanly(server, path):
    async def run():
        ws = await _ws(server, path=path)
        with pytest.raises(Closed) as closed:
            await asyncio.wait_for(ws.recv(), 30)
        assert closed.value.code == 4404

    asyncio.run(run())
    time.sleep(0.2)
    assert "Traceback" not in server.log.read_text()


def test_it_closes_a_websocket_that_sends_an_oversized_message(server):
    async def run():
        ws = await _ws(server)
        ws.writer.write(_frame(0x1, b"x" * 1024))  # small messages are ignored ...
        await ws.writer.drain()
        with pytest.raises(TimeoutError):  # ... and the socket stays open
            await asyncio.wait_for(ws.recv(), 1.0)
        ws.writer.write(_frame(0x1, b"x" * (65536 + 1)))
        await ws.writer.drain()
        with pytest.raises(Closed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        # autobahn fails the connection: close code 1009 (message too big), or the TCP
        # connection is dropped before the close frame is read.
        assert closed.value.code in (1009, None)

    asyncio.run(run())


def test_it_adds_a_listen_backlog_to_tcp_and_unix_listeners_only():
    from kvmweb.serve import with_backlog

    got = with_backlog(["tcp:port=8000:interface=127.0.0.1", "unix:/run/k.sock", "fd:fileno=3"], 1024)
    assert got == [
        "tcp:port=8000:interface=127.0.0.1:backlog=1024",
        "unix:/run/k.sock:backlog=1024",
        "fd:fileno=3",
    ]
    assert with_backlog(["tcp:port=1:backlog=64"], 1024) == ["tcp:port=1:backlog=64"]


def test_it_listens_with_the_configured_backlog(server):
    # For a listening socket, ss shows the accept queue's limit as Send-Q (Twisted's
    # default was 50: a thousand reconnecting watchers saw resets).
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{server.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "LISTEN" and int(out[2]) == 1024, out

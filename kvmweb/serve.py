"""`python -m kvmweb.serve [daphne options] kvmweb.asgi:application`: daphne with limits.

daphne (through Twisted) reads a whole request body into a buffer before the
application sees the request, and keeps a connection that trickles its headers open
for as long as bytes keep coming (Twisted's idle timeout restarts with every byte). An
ASGI middleware comes too late for both. This launcher runs daphne's own command line
with a request class and a connection class that:

- answer 413 and close as soon as the declared Content-Length, or the bytes of a
  chunked body counted so far, exceed KVMWEB_MAX_REQUEST_BYTES: the body is never
  buffered beyond the limit;
- answer 408 and close a connection whose request line, headers and body are not
  complete within KVMWEB_REQUEST_TIMEOUT seconds of its first byte (or of the
  connection), and drop a keep-alive connection idle for as long;

and passes WebSocket limits daphne already has (KVMWEB_WS_MAX_MESSAGE_BYTES for the
largest message and frame; handshake timeout) unless given on the command line. TCP and
UNIX listeners get a listen backlog of KVMWEB_LISTEN_BACKLOG (default 1024) instead of
Twisted's 50: with 50, a thousand browsers reconnecting their progress sockets at once
(a daphne restart) saw handshakes reset (benchmarks/progress_latency.py).

On SIGTERM daphne used to cancel every application at once and stop its event loop. A
request whose sync code (a view, a sync middleware) was still running on a worker thread
then waited forever for the loop to resume it, and Python's exit waits for that thread:
the process never exited until it was killed (a restarted server whose page had just
reconnected its job socket sat out every stop timeout). :class:`GracefulServer` instead
stops listening, closes every open WebSocket with 1012 "service restart" (htmx's ws
extension reconnects only after 1006, 1011, 1012 or 1013, never after 1001 "going away":
the pages reconnect, to the next server), lets the requests in flight finish for up to
KVMWEB_SHUTDOWN_GRACE seconds while the loop still runs, and only then cancels what is
left. A thread still stuck after that cannot hold the exit for more than a few seconds
(:func:`main`).

Everything else is daphne's (same options, same behaviour).
"""

import asyncio
import logging
import os
import sys
import threading
import time

# daphne.server installs Twisted's asyncio reactor: it must be imported before anything
# imports twisted.internet.reactor (which would install the default one).
import daphne.server  # noqa: I001
from daphne import http_protocol
from daphne.cli import CommandLineInterface
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.web import http

log = logging.getLogger(__name__)

SERVICE_RESTART = 1012  # WebSocket close code: the server restarts, reconnect later
# Seconds the process may take to exit once its event loop stopped before it exits
# without waiting for worker threads (one stuck on the stopped loop would wait forever).
EXIT_WATCHDOG = 3.0


def _limits():
    from django.conf import settings

    return settings.KVMWEB_MAX_REQUEST_BYTES, settings.KVMWEB_REQUEST_TIMEOUT


def _refuse(transport, status, reason):
    body = reason.encode()
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
    )
    transport.loseConnection()


class LimitedRequest(http_protocol.WebRequest):
    """daphne's request, refusing a body over the limit before buffering it."""

    refused = False
    received = 0

    def gotLength(self, length):
        super().gotLength(length)
        if length is not None and length > _limits()[0]:
            self._too_large()

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.received += len(data)
        if self.received > _limits()[0]:
            self._too_large()
            return
        super().handleContentChunk(data)

    def _too_large(self):
        self.refused = True
        if self.channel is not None and self.channel.transport is not None:
            _refuse(self.channel.transport, 413, "Payload Too Large")

    def requestReceived(self, command, path, version):
        if self.refused:
            return  # answered already; never hand it to the application
        super().requestReceived(command, path, version)


class LimitedChannel(http.HTTPChannel):
    """Twisted's HTTP connection with an absolute deadline for receiving each request."""

    deadline = None

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    def dataReceived(self, data):
        if not self._handlingRequest:
            self._arm()
        super().dataReceived(data)

    def allContentReceived(self):
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason):
        self._disarm()
        super().connectionLost(reason)

    def _arm(self):
        if self.deadline is None:
            self.deadline = self.callLater(_limits()[1], self._too_slow)  # set by the factory

    def _disarm(self):
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _too_slow(self):
        self.deadline = None
        if self.transport is not None:
            _refuse(self.transport, 408, "Request Timeout")


class LimitedFactory(http_protocol.HTTPFactory):
    def __init__(self, server):
        super().__init__(server)
        self.timeOut = _limits()[1]  # idle keep-alive connections

    def protocol(self):
        return http._GenericHTTPChannelProtocol(LimitedChannel())

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = LimitedRequest
        return protocol


class GracefulServer(daphne.server.Server):
    """daphne's server with a graceful stop (see the module docstring)."""

    def run(self):
        self.ports = []
        super().run()

    def listen_success(self, port):
        self.ports.append(port)
        super().listen_success(port)

    def kill_all_applications(self):
        # A "before shutdown" trigger: the reactor (and the asyncio loop under it) keeps
        # running until the returned Deferred fires.
        return defer.Deferred.fromFuture(asyncio.ensure_future(self._drain()))

    def _instances(self):
        return [
            details["application_instance"]
            for details in self.connections.values()
            if details.get("application_instance") is not None
        ]

    async def _drain(self):
        from django.conf import settings

        started = time.monotonic()
        for port in self.ports:
            port.stopListening()  # new connections go to the next server
        closed = 0
        for protocol in list(self.connections):
            if isinstance(protocol, WebSocketProtocol) and protocol.state == protocol.STATE_OPEN:
                # The close handshake tells the application (websocket.disconnect), which
                # ends; a browser that does not answer is dropped by autobahn's close timeout.
                # (autobahn's sendClose allows applications only 1000 and 3000-4999.)
                try:
                    protocol.sendCloseFrame(code=SERVICE_RESTART, isReply=False)
                    closed += 1
                except Exception:
                    log.warning("could not close WebSocket %r", protocol, exc_info=True)
        deadline = started + settings.KVMWEB_SHUTDOWN_GRACE
        while any(not i.done() for i in self._instances()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [i for i in self._instances() if not i.done()]
        for instance in left:
            instance.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        log.info(
            "Stopped in %.1f s: %d WebSocket(s) closed (service restart), %d application(s) cancelled",
            time.monotonic() - started,
            closed,
            len(left),
        )


class GracefulCommandLine(CommandLineInterface):
    server_class = GracefulServer


def _exit_watchdog(seconds):
    """Exit the process ``seconds`` from now unless it exited by itself before: worker
    threads are joined at exit, and one waiting on the stopped event loop never ends."""

    def watchdog():
        time.sleep(seconds)
        log.warning("worker threads still busy %.0f s after the server stopped; exiting anyway", seconds)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=watchdog, name="kvmweb-exit-watchdog", daemon=True).start()


def default_args(argv):
    """daphne options kvmweb sets unless the command line does."""
    from django.conf import settings

    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    defaults = {
        "--websocket-max-message-size": settings.KVMWEB_WS_MAX_MESSAGE_BYTES,
        "--websocket-max-frame-size": settings.KVMWEB_WS_MAX_MESSAGE_BYTES,
        "--websocket_connect_timeout": settings.KVMWEB_REQUEST_TIMEOUT,
    }
    extra = []
    for option, value in defaults.items():
        if option not in given:
            extra += [option, str(value)]
    return extra + list(argv)


def with_backlog(descriptions, backlog):
    """Twisted endpoint strings with ``backlog`` added to TCP and UNIX listeners that do
    not name one (an inherited file descriptor is already listening)."""
    out = []
    for d in descriptions:
        kind = d.split(":", 1)[0]
        if kind in ("tcp", "tcp6", "unix") and ":backlog=" not in d:
            d = f"{d}:backlog={int(backlog)}"
        out.append(d)
    return out


class _LazyFormat:
    """pprint.pformat(value), computed only if a log line that uses it is written."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __str__(self):
        import pprint

        return pprint.pformat(self.value)

    def __format__(self, spec):
        return format(str(self), spec)

    __repr__ = __str__


def lazy_autobahn_debug():
    """autobahn formats every new connection's ~40 options with pprint for a debug line
    that is not written (``self.log.debug("\n{attrs}", attrs=pformat(...))`` in
    WebSocketProtocol._connectionMade): about a tenth of the event loop's time per
    WebSocket handshake when hundreds of pages connect at once (profiled). Format it only when the
    line is written."""
    from autobahn.websocket import protocol

    protocol.pformat = _LazyFormat


def main(argv=None):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
    from daphne import cli, server
    from django.conf import settings

    lazy_autobahn_debug()

    server.HTTPFactory = LimitedFactory
    build = cli.build_endpoint_description_strings
    cli.build_endpoint_description_strings = lambda *a, **kw: with_backlog(
        build(*a, **kw), settings.KVMWEB_LISTEN_BACKLOG
    )
    GracefulCommandLine().run(default_args(sys.argv[1:] if argv is None else argv))
    _exit_watchdog(EXIT_WATCHDOG)


if __name__ == "__main__":
    main()

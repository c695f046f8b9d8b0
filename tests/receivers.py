"""Real receivers on loopback: an HTTP server that checks the webhook signature, and an
SMTP server (aiosmtpd) that keeps the mail it gets."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class WebhookReceiver:
    """Answers each POST with the next status of ``statuses`` (then 200); records every
    request with whether its signature verified against ``secret``."""

    def __init__(self):
        self.secret = ""
        self.statuses = []
        self.requests = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stamp = self.headers.get("X-Kvmweb-Timestamp", "")
                expected = (
                    "sha256="
                    + hmac.new(
                        receiver.secret.encode(), stamp.encode() + b"." + body, hashlib.sha256
                    ).hexdigest()
                )
                verified = hmac.compare_digest(expected, self.headers.get("X-Kvmweb-Signature", ""))
                fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(
                        {
                            "body": json.loads(body),
                            "verified": verified and fresh,
                            "status": status,
                            "event": self.headers.get("X-Kvmweb-Event"),
                        }
                    )
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def smtp(settings):
    """An aiosmtpd server on a free loopback port; settings point the email channel at it."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    class Keep(Message):
        def __init__(self):
            super().__init__()
            self.messages = []

        def handle_message(self, message):
            self.messages.append(message)

    import socket

    with socket.socket() as probe:  # a free port (aiosmtpd's readiness check needs a real one)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = Keep()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=30)
    controller.start()
    settings.NOTIFY_SMTP_HOST = "127.0.0.1"
    settings.NOTIFY_SMTP_PORT = port
    settings.NOTIFY_SMTP_USER = ""
    settings.NOTIFY_SMTP_TLS = False
    yield handler
    controller.stop()

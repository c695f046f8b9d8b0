"""ASGI guards around the application (kvmweb/asgi.py).

- BodyLimit: a request body over KVMWEB_MAX_REQUEST_BYTES is answered 413, by its
  Content-Length or by counting the chunks as they arrive, before Django reads it. (Under
  daphne, kvmweb/serve.py refuses it earlier, before daphne buffers it; this guard holds
  under any ASGI server.)
- OriginCheck: a WebSocket handshake is accepted only when its Origin is exactly (scheme,
  host and port) the site's own origin as the browser sees it (the Host header, with
  https when the request is secure or, behind the proxy, says X-Forwarded-Proto: https),
  or one of KVMWEB_CSRF_TRUSTED_ORIGINS; the Host itself must be in ALLOWED_HOSTS.
- NoRoute: a WebSocket path that matches no route is accepted and closed with 4404 (the
  code the consumers use for "no such job"), not a 500 with a traceback.
"""

import logging
from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = settings.KVMWEB_MAX_REQUEST_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_large = declared is not None and int(declared) > limit
        except ValueError:
            too_large = False  # the server answers a malformed length itself
        if too_large:
            return await _payload_too_large(send)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _payload_too_large(send)


async def _payload_too_large(send):
    body = b"Payload Too Large"
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _origin(url):
    """(scheme, host, port) of an origin URL, or None when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[parts.scheme]


def allowed_origins(scope):
    """The origins a WebSocket of this request may come from (exact tuples)."""
    headers = dict(scope.get("headers") or [])
    host = headers.get(b"host", b"").decode("latin-1")
    domain, port = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return set()
    secure = scope.get("scheme") in ("wss", "https")
    if settings.SECURE_PROXY_SSL_HEADER:
        secure = secure or headers.get(b"x-forwarded-proto", b"").decode("latin-1").strip() == "https"
    scheme = "https" if secure else "http"
    own = (scheme, domain.rstrip("."), int(port) if port else DEFAULT_PORTS[scheme])
    trusted = {_origin(url) for url in settings.CSRF_TRUSTED_ORIGINS} - {None}
    return {own} | trusted


class OriginCheck:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        origin = dict(scope.get("headers") or []).get(b"origin", b"").decode("latin-1")
        if _origin(origin) is None or _origin(origin) not in allowed_origins(scope):
            log.warning("WebSocket refused: origin %r is not this site's", origin[:200])
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 403})  # handshake refused (HTTP 403)
            return
        return await self.app(scope, receive, send)


class NoRoute:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        try:
            return await self.app(scope, receive, send)
        except ValueError as exc:
            # channels' URLRouter: "No route found for path ..." (raised before the app
            # has received or sent anything).
            if scope["type"] != "websocket" or not str(exc).startswith("No route found"):
                raise
        log.info("WebSocket path %r matches no route", scope.get("path", "")[:200])
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 4404})

"""ASGI entry point: HTTP through Django, WebSockets through Channels.

Run it with `python -m kvmweb.serve` (daphne with request limits, see kvmweb/serve.py).
HTTP request bodies are capped (kvmweb/limits.py BodyLimit). WebSockets are origin-checked
exactly against the site's own origin and the trusted origins (OriginCheck), admitted a
few handshakes at a time (HandshakeGate: a thousand reconnecting at once are served one
after another instead of all timing out), authenticated from the session (channels' rules,
looked up on one DB thread that keeps its connection: kvmweb/handshake.py), and a path that
matches no route closes cleanly (NoRoute).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from api.metrics import WatcherCount  # noqa: E402
from kvmweb.handshake import HandshakeGate, SessionAuthStack  # noqa: E402
from kvmweb.limits import BodyLimit, NoRoute, OriginCheck  # noqa: E402
from kvmweb.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodyLimit(django_asgi_app),
        "websocket": WatcherCount(
            OriginCheck(HandshakeGate(SessionAuthStack(NoRoute(URLRouter(websocket_urlpatterns)))))
        ),
    }
)

"""Site-wide HTTP hardening that Django 5.2 does not ship: the Content-Security-Policy
header and one-line logging of refused requests.

The policy allows scripts from our own origin only (static/js/*.js and the htmx files
that django-htmx ships): no inline <script>, no on*= attributes, no eval. An injected
script tag or handler therefore does not run even if some escaping were ever missed.
Inline *styles* stay allowed: htmx inserts its indicator style, a few templates size
the chart with a style attribute, and styles cannot run code.
"""

import logging

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",  # XHR and the same-origin WebSockets (ws/jobs/)
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ContentSecurityPolicyMiddleware:
    """Add the Content-Security-Policy header to every response that has none yet."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


class OneLineForbidden(logging.Filter):
    """django.request logs a refused request (403, PermissionDenied) with the whole
    traceback; a refusal is an expected answer, so keep the one line and drop the rest."""

    def filter(self, record):
        if getattr(record, "status_code", None) == 403:
            record.exc_info = None
            record.exc_text = None
        return True

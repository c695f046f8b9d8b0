"""Sending one delivery: email (SMTP), webhook (signed JSON) or an apprise URL.

Each sender returns (ok, status_code, error) and never raises: a receiver's failure is the
delivery's business (retried with backoff), never the caller's.
"""

import hashlib
import hmac
import json
import smtplib
import time
import urllib.error
import urllib.request

from django.conf import settings
from django.core.mail import EmailMessage, get_connection


def signature(secret, timestamp, body):
    """X-Kvmweb-Signature: hex HMAC-SHA256 of ``timestamp + "." + body`` with the channel's
    secret. Receivers recompute it and refuse old timestamps (replays)."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is an answer (3xx, retried), not an invitation to post elsewhere.
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def send_webhook(subscription, delivery):
    body = json.dumps(delivery.payload, sort_keys=True, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        subscription.target,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "kvmweb-notifications",
            "X-Kvmweb-Event": delivery.event,
            "X-Kvmweb-Delivery": delivery.event_key,
            "X-Kvmweb-Timestamp": timestamp,
            "X-Kvmweb-Signature": "sha256=" + signature(subscription.secret, timestamp, body),
        },
    )
    try:
        with _opener.open(request, timeout=settings.NOTIFY_TIMEOUT) as response:
            return 200 <= response.status < 300, response.status, ""
    except urllib.error.HTTPError as exc:
        return False, exc.code, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, None, str(getattr(exc, "reason", exc))[:500]


def send_email(subscription, delivery):
    payload = delivery.payload
    text = payload.get("summary", delivery.event) + "\n\n" + json.dumps(payload, indent=2, sort_keys=True)
    recipients = [a.strip() for a in subscription.target.split(",") if a.strip()]
    connection = get_connection(
        "django.core.mail.backends.smtp.EmailBackend",
        host=settings.NOTIFY_SMTP_HOST,
        port=settings.NOTIFY_SMTP_PORT,
        username=settings.NOTIFY_SMTP_USER or None,
        password=settings.NOTIFY_SMTP_PASSWORD or None,
        use_tls=settings.NOTIFY_SMTP_TLS,
        timeout=settings.NOTIFY_TIMEOUT,
        fail_silently=False,
    )
    message = EmailMessage(
        subject=f"[kvmweb] {payload.get('summary', delivery.event)}"[:200],
        body=text,
        from_email=settings.NOTIFY_FROM,
        to=recipients,
        headers={"X-Kvmweb-Event": delivery.event, "X-Kvmweb-Delivery": delivery.event_key},
        connection=connection,
    )
    try:
        message.send()
    except smtplib.SMTPResponseException as exc:
        return False, exc.smtp_code, str(exc.smtp_error)[:500]
    except (smtplib.SMTPException, OSError) as exc:
        return False, None, str(exc)[:500]
    return True, 250, ""


def send_apprise(subscription, delivery):
    """Chat/push targets through apprise, when it is installed (optional dependency)."""
    try:
        import apprise
    except ImportError:
        return False, None, "apprise is not installed (pip install apprise)"
    notifier = apprise.Apprise()
    if not notifier.add(subscription.target):
        return False, None, "apprise does not understand this URL"
    ok = notifier.notify(title="kvmweb", body=delivery.payload.get("summary", delivery.event))
    return bool(ok), None, "" if ok else "apprise reported a failure"


SENDERS = {"email": send_email, "webhook": send_webhook, "apprise": send_apprise}

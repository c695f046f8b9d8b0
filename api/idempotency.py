"""``Idempotency-Key`` for the API's POSTs: the same key from the same user gets the first
answer again (a retried job creation makes one job). See IdempotencyKey."""

import functools
import hashlib
import json
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.response import Response

from api.models import IdempotencyKey

KEEP_FOR = timedelta(hours=24)
MAX_KEY = 200


def _fingerprint(request):
    try:
        body = json.dumps(request.data, sort_keys=True, default=str)
    except (TypeError, ValueError):
        body = repr(request.data)
    return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()


def _replay(row):
    response = Response(row.body, status=row.status_code)
    if row.location:
        response["Location"] = row.location
    response["Idempotent-Replayed"] = "true"
    return response


def idempotent(method):
    """Decorate an APIView's post(): remember its answer under the request's key."""

    @functools.wraps(method)
    def wrapper(self, request, *args, **kwargs):
        key = request.headers.get("Idempotency-Key", "").strip()
        if not key:
            return method(self, request, *args, **kwargs)
        if len(key) > MAX_KEY:
            return Response({"detail": f"Idempotency-Key is longer than {MAX_KEY} characters."}, status=400)
        fingerprint = _fingerprint(request)
        IdempotencyKey.objects.filter(created_at__lt=timezone.now() - KEEP_FOR).delete()
        try:
            with transaction.atomic():
                row = IdempotencyKey.objects.create(user=request.user, key=key, fingerprint=fingerprint)
        except IntegrityError:
            row = IdempotencyKey.objects.filter(user=request.user, key=key).first()
            if row is None:  # expired and purged between our insert and this read: rare
                return Response({"detail": "Retry the request."}, status=409)
            if row.fingerprint != fingerprint:
                return Response(
                    {"detail": "This Idempotency-Key was used for a different request."}, status=422
                )
            if row.status_code is None:
                return Response(
                    {"detail": "A request with this Idempotency-Key is still running."}, status=409
                )
            return _replay(row)
        try:
            response = method(self, request, *args, **kwargs)
        except Exception:
            # Refusals (404/403/400 raised as exceptions) and crashes are not remembered:
            # the same request may be retried and is judged again.
            IdempotencyKey.objects.filter(pk=row.pk).delete()
            raise
        if response.status_code >= 500:
            IdempotencyKey.objects.filter(pk=row.pk).delete()
            return response
        IdempotencyKey.objects.filter(pk=row.pk).update(
            status_code=response.status_code,
            body=json.loads(json.dumps(response.data, default=str)),
            location=response.get("Location", "")[:500],
        )
        return response

    return wrapper

"""Dirty-rate measurements shared through the database.

Measuring a guest's dirty rate takes libvirt a second (KVMWEB_PREFLIGHT_DIRTY_RATE_SECONDS).
The checklist's in-process reuse (migrations_app/preflight.py) helps one web server, but
every `manage.py migrate_vm` / `preflight` process and every other daphne process measured
again. A measurement is therefore stored in ``DirtyRateSample`` (one row per guest) and a
checklist that starts within KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE seconds of it reuses it.

Both functions run on the checklist caller's thread and database connection (the checks
themselves run on pool threads): ``recall`` before the checks, ``remember`` after them.
The store is a cache: a database error reading or writing it never fails a checklist.
"""

import logging
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

log = logging.getLogger(__name__)


def max_age():
    """Seconds a measurement stays usable (0: never reused)."""
    return float(getattr(settings, "PREFLIGHT_DIRTY_RATE_MAX_AGE", 60.0))


def recall(uuid, *, now=None):
    """The stored measurement of guest ``uuid`` younger than ``max_age()`` as the
    checklist's measurement dict (``mib_per_s``, ``mode``, ``period``, ``measured_at``
    epoch seconds, ``age_s``, ``stored`` True), or None."""
    from migrations_app.models import DirtyRateSample

    window = max_age()
    if window <= 0:
        return None
    now = now or timezone.now()
    try:
        row = DirtyRateSample.objects.filter(
            vm_uuid=str(uuid), measured_at__gt=now - timedelta(seconds=window)
        ).first()
    except DatabaseError:  # no table yet (a command before migrate), database down
        return None
    if row is None:
        return None
    return {
        "mib_per_s": row.mib_per_s,
        "mode": row.mode,
        "period": row.period,
        "measured_at": row.measured_at.timestamp(),
        "age_s": round(max(0.0, (now - row.measured_at).total_seconds()), 1),
        "stored": True,
    }


def remember(uuid, host_name, measured):
    """Store a fresh measurement (the dict the checklist got from libvirt) for guest
    ``uuid``; a recalled one (``stored``) or None is ignored. Returns whether it stored.

    The measurement time is the one libvirt's figure was taken at, so a measurement made
    by a background primer and used a while later does not look fresher than it is.
    Concurrent writers: the last one wins; a unique-key race between two first writers
    leaves the other's row, which is as good."""
    from migrations_app.models import DirtyRateSample

    if not measured or measured.get("stored") or max_age() <= 0:
        return False
    at = measured.get("measured_at")
    measured_at = timezone.now() if at is None else datetime.fromtimestamp(at, tz=UTC)
    values = {
        "host_name": (host_name or "")[:255],
        "mib_per_s": max(0, int(measured["mib_per_s"])),
        "mode": str(measured.get("mode", ""))[:32],
        "period": max(0, int(measured.get("period", 0))),
        "measured_at": measured_at,
    }
    try:
        with transaction.atomic():  # a savepoint when the caller is in a transaction
            DirtyRateSample.objects.update_or_create(vm_uuid=str(uuid), defaults=values)
    except IntegrityError:
        return False
    except DatabaseError:
        log.warning("could not store the dirty-rate measurement of %s", uuid, exc_info=True)
        return False
    return True

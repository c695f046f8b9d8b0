"""Health endpoint for load balancers and monitoring: ``GET /health/``.

It answers three questions, each with a word, never with inventory or error text:

- database: can this process run ``SELECT 1`` on its database?
- channel_layer: does a message sent on the channel layer come back (a send/receive round
  trip on a fresh channel)? With REDIS_URL this exercises Redis; embedded, the in-process
  layer.
- workers: when was each django-q2 cluster last seen working? django-q2's own cluster
  statistics live in Django's cache, which is per process here (LocMemCache), so another
  machine cannot read them. Instead each cluster runs a tiny heartbeat task every minute
  (schedules created by ``ensure_heartbeat_schedules``, called from ``manage.py
  ensure_schedules``) and we read the newest finished task per cluster from django-q2's
  task table (``Task.cluster`` names the cluster that ran it). A migrations cluster whose
  workers are all busy with long migrations cannot run its heartbeat, so for it the newest
  heartbeat of an active migration job also counts as "seen".

HTTP 200 when everything is healthy, 503 otherwise. ``?scope=web`` judges only what this
web process needs (database and channel layer) and still reports the workers: use it for a
load balancer, so that a stopped worker machine does not take every web node out of
rotation; use the plain URL for monitoring.

The view is anonymous (it reveals no inventory) and never calls libvirt.
"""

import asyncio
import logging
import secrets
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.db.models import Max
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from migrations_app.models import MigrationJob

log = logging.getLogger(__name__)

HEARTBEAT_FUNC = "kvmweb.health.heartbeat"
# A heartbeat is scheduled every minute and each cluster's scheduler looks every ~30 s
# (django-q2's guard loop), so beats are 60-90 s apart: three minutes unseen means at least
# one beat was missed.
WORKER_MAX_AGE = timedelta(minutes=3)
# Heartbeat results older than this are pruned by the heartbeat itself, so they do not
# crowd real task results out of django-q2's save_limit.
HEARTBEAT_KEEP = timedelta(minutes=15)
CHANNEL_LAYER_TIMEOUT = 3.0  # seconds
OK, ERROR, STALE, UNKNOWN = "ok", "error", "stale", "unknown"


def clusters():
    """{label: django-q2 cluster name}: "default" (the main cluster, named after
    Q_CLUSTER["name"]) plus each ALT_CLUSTERS entry under its own name."""
    names = {"default": settings.Q_CLUSTER["name"]}
    for name in settings.Q_CLUSTER.get("ALT_CLUSTERS", {}):
        names[name] = name
    return names


def heartbeat():
    """The heartbeat task (runs on every cluster each minute). Its finished-task row is the
    proof of life; it prunes older heartbeat rows so they stay a handful."""
    from django_q.conf import Conf
    from django_q.models import Task

    # Only this cluster's rows: a stopped cluster keeps its last beat as "last seen".
    Task.objects.filter(
        func=HEARTBEAT_FUNC, cluster=Conf.CLUSTER_NAME, stopped__lt=timezone.now() - HEARTBEAT_KEEP
    ).delete()
    return "ok"


def ensure_heartbeat_schedules():
    """Create or update one heartbeat schedule per cluster (idempotent). Returns names."""
    from django_q.models import Schedule

    default = settings.Q_CLUSTER["name"]
    made = []
    for label, cluster in clusters().items():
        name = f"health-heartbeat-{label}"
        Schedule.objects.update_or_create(
            name=name,
            defaults={
                "func": HEARTBEAT_FUNC,
                "schedule_type": Schedule.MINUTES,
                "minutes": 1,
                "repeats": -1,
                # The default cluster's scheduler takes schedules without a cluster; an
                # alternative cluster only those naming it.
                "cluster": None if cluster == default else cluster,
            },
        )
        made.append(name)
    return made


def check_database():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return OK
    except Exception:
        log.exception("health: database check failed")
        return ERROR


async def _layer_round_trip():
    layer = get_channel_layer()
    if layer is None:
        return False
    channel = await layer.new_channel("health.")
    token = secrets.token_hex(8)
    await layer.send(channel, {"type": "health.ping", "token": token})
    message = await layer.receive(channel)
    return message.get("token") == token


async def _bounded_round_trip():
    return await asyncio.wait_for(_layer_round_trip(), CHANNEL_LAYER_TIMEOUT)


def check_channel_layer():
    try:
        return OK if async_to_sync(_bounded_round_trip)() else ERROR
    except Exception:
        log.exception("health: channel layer check failed")
        return ERROR


def worker_last_seen():
    """{label: datetime or None}: newest finished task per cluster, and for the
    migrations cluster also the newest heartbeat of an active migration job."""
    from django_q.models import Task

    names = clusters()
    rows = dict(
        Task.objects.filter(cluster__in=names.values())
        .values_list("cluster")
        .annotate(last=Max("stopped"))
        .order_by()
    )
    seen = {label: rows.get(cluster) for label, cluster in names.items()}
    if "migrations" in seen:
        busy = MigrationJob.objects.active().aggregate(last=Max("heartbeat_at"))["last"]
        if busy and (seen["migrations"] is None or busy > seen["migrations"]):
            seen["migrations"] = busy
    return seen


def check_workers(now=None):
    now = now or timezone.now()
    try:
        seen = worker_last_seen()
    except Exception:
        log.exception("health: worker check failed")
        return {label: {"status": UNKNOWN, "last_seen": None} for label in clusters()}
    report = {}
    for label, last in seen.items():
        status = OK if last is not None and now - last <= WORKER_MAX_AGE else STALE
        report[label] = {"status": status, "last_seen": last.isoformat() if last else None}
    return report


@never_cache
@require_safe  # GET and HEAD (some load balancers probe with HEAD)
def health(request):
    """Report database, worker and channel-layer health; 200 when healthy, else 503."""
    database = check_database()
    channel_layer = check_channel_layer()
    if database == OK:
        workers = check_workers()
    else:
        workers = {label: {"status": UNKNOWN, "last_seen": None} for label in clusters()}
    healthy = database == OK and channel_layer == OK
    if request.GET.get("scope") != "web":
        healthy = healthy and all(w["status"] == OK for w in workers.values())
    body = {
        "status": OK if healthy else ERROR,
        "database": database,
        "channel_layer": channel_layer,
        "workers": workers,
    }
    return JsonResponse(body, status=200 if healthy else 503)

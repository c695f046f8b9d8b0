"""/metrics in Prometheus text format (docs/deploy.md, "Metrics").

Two sources, added up on each scrape:

* Facts the database already holds are read at scrape time by ``DatabaseCollector``:
  migrations by mode and outcome, duration and downtime histograms, bytes moved, jobs by
  active state, host reachability, audit events written, notification deliveries. Nothing
  in the migration path has to remember to count, a restart loses nothing, and every
  process answers the same.
* Events that leave no row are counted where they happen, in prometheus-client's
  multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by kvmweb/settings.py): open WebSocket
  watchers (an ASGI wrapper in kvmweb/asgi.py) and preflight failures by check
  (``observe_preflight``: the API's own runs; the dry-run page's and the wizard's, which
  the migrations app announces through ``migrations_app.signals.preflight_checked``,
  subscribed in api/apps.py; the jobs' from their request's audit event).

Access: loopback, the addresses in KVMWEB_METRICS_ALLOW, or ``Authorization: Bearer`` with
a token of a user holding api.view_metrics. Everyone else is refused.
"""

import ipaddress
import logging

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.http import HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from kvmweb.audit.services import client_ip

log = logging.getLogger(__name__)

PREFLIGHT_FAILURES = Counter(
    "kvmweb_preflight_failures", "Preflight checks that failed, by check id", ["check", "source"]
)
PREFLIGHT_RUNS = Counter(
    "kvmweb_preflight_runs", "Preflight checklists observed, by verdict", ["verdict", "source"]
)
WATCHERS = Gauge(
    "kvmweb_websocket_watchers",
    "Open WebSocket connections (job and job-list watchers)",
    multiprocess_mode="livesum",
)

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)  # seconds
DOWNTIME_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300)  # seconds


def observe_preflight(report, source="api"):
    """Count one checklist run and its failed checks (``report``: a preflight Report or its
    dict). Never raises: metrics must not break the caller."""
    try:
        data = report if isinstance(report, dict) else report.to_dict()
        PREFLIGHT_RUNS.labels(verdict=data.get("verdict") or "unknown", source=source).inc()
        for result in data.get("results") or []:
            if result.get("status") == "fail":
                PREFLIGHT_FAILURES.labels(check=result.get("id") or "?", source=source).inc()
    except Exception:  # noqa: BLE001
        log.exception("could not count a preflight report")


class WatcherCount:
    """ASGI wrapper around the WebSocket application: one more watcher while a socket is open."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        WATCHERS.inc()
        try:
            return await self.app(scope, receive, send)
        finally:
            WATCHERS.dec()


def _histogram(name, doc, rows, buckets, scale):
    """A histogram family from per-mode aggregate rows with b0..bN cumulative counts."""
    family = HistogramMetricFamily(name, doc, labels=["mode"])
    for row in rows:
        points = [(floatToGoString(b), row[f"b{i}"]) for i, b in enumerate(buckets)] + [("+Inf", row["n"])]
        family.add_metric([row["mode"]], points, sum_value=(row["total"] or 0) / scale)
    return family


def _bucket_counts(field, buckets, scale):
    return {f"b{i}": Count("id", filter=Q(**{f"{field}__lte": b * scale})) for i, b in enumerate(buckets)}


class DatabaseCollector:
    """Job, host, audit and notification figures read from the database at scrape time."""

    def collect(self):
        from hosts.models import Host
        from kvmweb.audit.models import AuditEvent
        from migrations_app.models import MigrationJob

        jobs = MigrationJob.objects.order_by()
        finished = CounterMetricFamily(
            "kvmweb_migrations", "Finished migration jobs by mode and outcome", labels=["mode", "outcome"]
        )
        for row in (
            jobs.filter(status__in=MigrationJob.FINAL_STATES).values("mode", "status").annotate(n=Count("id"))
        ):
            finished.add_metric([row["mode"], row["status"]], row["n"])
        yield finished

        moved = CounterMetricFamily(
            "kvmweb_migration_bytes", "Bytes moved by finished migrations", labels=["mode"]
        )
        for row in (
            jobs.filter(status__in=MigrationJob.FINAL_STATES).values("mode").annotate(b=Sum("data_processed"))
        ):
            moved.add_metric([row["mode"]], row["b"] or 0)
        yield moved

        done = jobs.filter(status=MigrationJob.SUCCEEDED)
        rows = (
            done.filter(elapsed_ms__isnull=False)
            .values("mode")
            .annotate(
                n=Count("id"), total=Sum("elapsed_ms"), **_bucket_counts("elapsed_ms", DURATION_BUCKETS, 1000)
            )
        )
        yield _histogram(
            "kvmweb_migration_duration_seconds",
            "Duration of succeeded migrations",
            rows,
            DURATION_BUCKETS,
            1000,
        )
        rows = (
            done.filter(downtime_ms__isnull=False)
            .values("mode")
            .annotate(
                n=Count("id"),
                total=Sum("downtime_ms"),
                **_bucket_counts("downtime_ms", DOWNTIME_BUCKETS, 1000),
            )
        )
        yield _histogram(
            "kvmweb_migration_downtime_seconds",
            "Downtime of succeeded migrations",
            rows,
            DOWNTIME_BUCKETS,
            1000,
        )

        active = GaugeMetricFamily(
            "kvmweb_migration_jobs", "Jobs not finished yet, by state", labels=["status"]
        )
        counts = dict(
            jobs.filter(status__in=MigrationJob.ACTIVE_STATES).values_list("status").annotate(n=Count("id"))
        )
        for state in MigrationJob.ACTIVE_STATES:
            active.add_metric([state], counts.get(state, 0))
        yield active

        up = GaugeMetricFamily(
            "kvmweb_host_up", "1 if the host answered its last probe, 0 if not", labels=["host"]
        )
        hosts = GaugeMetricFamily("kvmweb_hosts", "Registered hosts by reachability", labels=["status"])
        by_status = {}
        for name, status in Host.objects.order_by("name").values_list("name", "status"):
            by_status[status] = by_status.get(status, 0) + 1
            if status != Host.UNKNOWN:
                up.add_metric([name], 1 if status == Host.REACHABLE else 0)
        for status, _label in Host.STATUSES:
            hosts.add_metric([status], by_status.get(status, 0))
        yield up
        yield hosts

        audit = CounterMetricFamily(
            "kvmweb_audit_events", "Audit events written, by outcome", labels=["outcome"]
        )
        for outcome, n in AuditEvent.objects.order_by().values_list("outcome").annotate(n=Count("id")):
            audit.add_metric([outcome], n)
        yield audit

        from notifications.models import Delivery

        deliveries = GaugeMetricFamily(
            "kvmweb_notification_deliveries", "Notification deliveries by state", labels=["status"]
        )
        for status, n in Delivery.objects.order_by().values_list("status").annotate(n=Count("id")):
            deliveries.add_metric([status], n)
        yield deliveries


def _allowed_address(ip):
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    for item in settings.METRICS_ALLOW:
        try:
            if address in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            log.warning("KVMWEB_METRICS_ALLOW: %r is not an address or network", item)
    return False


def _refusal(request):
    """None when the caller may read /metrics, else the response that refuses them."""
    if _allowed_address(client_ip(request)):
        return None
    header = request.headers.get("Authorization", "")
    keyword, _, text = header.partition(" ")
    if keyword.lower() != "bearer" or not text:
        response = HttpResponse("metrics: loopback, KVMWEB_METRICS_ALLOW or an API token\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="kvmweb"'
        return response
    from api import services

    try:
        user, _token = services.check_token(text, request)
    except services.TokenRefused:
        return HttpResponse("invalid token\n", status=401)
    if not user.has_perm("api.view_metrics"):
        return HttpResponse("this token's user may not read metrics\n", status=403)
    return None


def registry():
    """Every process's counters (multiprocess files) plus the database figures."""
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    reg.register(DatabaseCollector())
    return reg


def metrics(request):
    refused = _refusal(request)
    if refused is not None:
        return refused
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)

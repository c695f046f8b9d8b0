"""The audit history: filtered list, one event's details, CSV/JSON export."""

import json

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db import transaction
from django.http import StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from kvmweb.access import get_scoped_or_404, require, scoped
from kvmweb.audit import export, objects, record
from kvmweb.audit.forms import AuditFilterForm
from kvmweb.audit.models import AuditEvent
from migrations_app.models import MigrationJob

PERM = "audit.view_auditevent"
PAGE_SIZE = 50


def _filtered(request):
    form = AuditFilterForm(request.GET or None)
    return form, form.filter(scoped(AuditEvent, request.user)).order_by("-id")


@login_required
def event_list(request):
    require(request.user, PERM)
    form, events = _filtered(request)
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    page.object_list = objects.describe(page.object_list, request.user)
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "audit/event_list.html", {"form": form, "page": page, "query": query.urlencode()})


def _pretty(value):
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


# Parts of a migration event's details shown as their own sections on the detail page.
SECTIONS = [
    ("plan", _("Plan")),
    ("preflight", _("Preflight")),
    ("result", _("Final statistics")),
    ("stats", _("Statistics")),
]


@login_required
def event_detail(request, pk):
    event = get_scoped_or_404(AuditEvent, request.user, perm=PERM, pk=pk)
    objects.describe([event], request.user)
    details = event.details if isinstance(event.details, dict) else {"value": event.details}
    parts = dict(details)
    preflight = parts.get("preflight")
    if not parts.get("plan") and isinstance(preflight, dict) and preflight.get("plan"):
        parts["plan"] = preflight["plan"]  # the checklist carries the plan it checked
    sections = [(label, parts[key]) for key, label in SECTIONS if parts.get(key)]
    # The rest of the details (what the sections and the virsh line do not show).
    rest = {k: v for k, v in details.items() if k not in {key for key, _label in SECTIONS} | {"virsh"}}
    job = None
    if event.target_type == "migrations_app.migrationjob" and event.target_id.isdigit():
        job = scoped(MigrationJob, request.user).filter(pk=int(event.target_id)).first()
    return render(
        request,
        "audit/event_detail.html",
        {
            "event": event,
            "details_json": _pretty(details),
            "rest": rest,
            "sections": [(label, _pretty(value), value) for label, value in sections],
            "job": job,
            "job_json": [
                (label, _pretty(getattr(job, field)))
                for field, label in (
                    ("preflight", _("Preflight (stored with the job)")),
                    ("result", _("Job result")),
                )
                if job is not None and getattr(job, field)
            ],
        },
    )


@login_required
def event_export(request, fmt):
    """Stream the filtered set. The export itself is audited: who took a copy of which part
    of the history is part of the history."""
    require(request.user, PERM)
    form, events = _filtered(request)
    # The export is the history as it was when asked for; it does not include its own
    # event or anything written while it streams.
    last_id = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    events = events.filter(id__lte=last_id)
    with transaction.atomic():
        record(
            "audit.export",
            request=request,
            target_type="audit.auditevent",
            details={"format": fmt, "filters": form.active_filters()},
        )
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    if fmt == "csv":
        response = StreamingHttpResponse(export.csv_stream(events), content_type="text/csv; charset=utf-8")
    else:
        response = StreamingHttpResponse(export.json_stream(events), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="kvmweb-audit-{stamp}.{fmt}"'
    return response

"""Maintenance switch, evacuation/bulk planner pages, batch pages and controls.

Thin views: access helper, one service call, redirect or render. Batches follow the
roles: operators and administrators (hosts.maintain_host); everyone else gets 404 for a
batch (out of scope) and 403 for the planner of a host they can see.
"""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from fleet import services
from fleet.live import batch_context
from fleet.models import Batch
from fleet.planner import make_plan
from hosts.models import VM, Host
from hosts.services import do_set_maintenance
from kvmweb.access import get_scoped_or_404, require, scoped
from migrations_app.models import MigrationJob

MODES = [m for m, _label in MigrationJob.MODES]


def _int(value, default, low=1, high=64):
    try:
        return max(low, min(high, int(value)))
    except (TypeError, ValueError):
        return default


def _plan_form(data):
    """Limits, cold allowance and the person's per-row changes from the planner form."""
    limits = {
        "max_parallel": _int(data.get("max_parallel"), 4),
        "per_source": _int(data.get("per_source"), 2),
        "per_target": _int(data.get("per_target"), 2),
    }
    overrides = {}
    for key, value in data.items():
        if key.startswith("target-") and value:
            overrides.setdefault(int(key[7:]), {})["target"] = _int(value, None, 1, 10**12)
        elif key.startswith("mode-") and value in MODES:
            overrides.setdefault(int(key[5:]), {})["mode"] = value
    return limits, overrides, bool(data.get("allow_cold"))


def _window(data):
    """{"not_before": ..., "not_after": ...} from the form's datetime-local fields (in the
    server's time zone); empty or unreadable fields are left out."""
    out = {}
    for field in ("not_before", "not_after"):
        when = parse_datetime(data.get(field) or "")
        if when is not None:
            out[field] = when if timezone.is_aware(when) else timezone.make_aware(when)
    return out


def _vms_for(request, host):
    if host is not None:
        return services.evacuation_vms(host)
    ids = [int(i) for i in request.POST.getlist("vm") + request.GET.getlist("vm") if str(i).isdigit()]
    return list(scoped(VM, request.user).filter(pk__in=ids, gone=False).select_related("host"))


def _planner(request, host=None):
    """The planner page for a host (evacuate) or a selection of VMs (bulk): GET shows
    the form, POST "check" plans (or re-checks with the person's changes), POST "start"
    plans again with the same choices and starts the batch."""
    data = request.POST if request.method == "POST" else request.GET
    limits, overrides, allow_cold = _plan_form(data)
    vms = _vms_for(request, host)
    plan = None
    if request.method == "POST":
        plan = make_plan(vms, request.user, overrides=overrides, allow_cold=allow_cold, limits=limits)
        if data.get("action") == "start" and plan.placed:
            batch = services.do_create_batch(
                plan,
                request.user,
                kind=Batch.EVACUATE if host else Batch.BULK,
                host=host,
                stop_on_failure=bool(data.get("stop_on_failure")),
                request=request,
                **_window(data),
            )
            messages.success(request, _("Batch #%(b)d started.") % {"b": batch.pk})
            return redirect("fleet:batch", pk=batch.pk)
    return render(
        request,
        "fleet/plan.html",
        {
            "host": host,
            "vms": vms,
            "plan": plan,
            "limits": limits,
            "allow_cold": allow_cold,
            "modes": MigrationJob.MODES,
        },
    )


@login_required
def evacuate(request, pk):
    host = get_scoped_or_404(Host, request.user, perm=services.PERM, pk=pk)
    return _planner(request, host)


@login_required
def bulk(request):
    require(request.user, services.PERM)
    if request.method == "GET" and not request.GET.getlist("vm"):
        vms = scoped(VM, request.user).filter(gone=False).select_related("host").order_by("name")
        return render(request, "fleet/bulk.html", {"vms": vms})
    return _planner(request, None)


@login_required
@require_POST
def host_maintenance(request, pk):
    host = get_scoped_or_404(Host, request.user, perm=services.PERM, pk=pk)
    on = bool(request.POST.get("on"))
    do_set_maintenance(host, on, reason=request.POST.get("reason", ""), actor=request.user, request=request)
    if on:
        messages.success(
            request, _("%(h)s is in maintenance: it is no migration target any more.") % {"h": host.name}
        )
    else:
        messages.success(request, _("%(h)s is out of maintenance.") % {"h": host.name})
    return redirect("hosts:detail", pk=host.pk)


@login_required
def batch_list(request):
    batches = scoped(Batch, request.user)[:100]
    if not request.user.has_perm("fleet.view_batch"):
        batches = Batch.objects.none()
    return render(request, "fleet/batch_list.html", {"batches": batches})


@login_required
def batch_detail(request, pk):
    batch = get_scoped_or_404(Batch, request.user, pk=pk)
    return render(request, "fleet/batch_detail.html", batch_context(batch))


@login_required
def batch_rows(request, pk):
    """The live part of the batch page (aggregate, one row per VM) as HTML: what the
    WebSocket (fleet/live.py) pushes, for clients without one."""
    batch = get_scoped_or_404(Batch, request.user, pk=pk)
    return render(request, "fleet/partials/batch_live.html", batch_context(batch))


def _control(request, pk, do):
    batch = get_scoped_or_404(Batch, request.user, perm=services.PERM, pk=pk)
    try:
        result = do(batch)
    except services.BatchError as exc:
        messages.error(request, str(exc))
        result = batch
    return redirect("fleet:batch", pk=result.pk)


@login_required
@require_POST
def batch_pause(request, pk):
    return _control(request, pk, lambda b: services.do_pause_batch(b, request.user, request))


@login_required
@require_POST
def batch_resume(request, pk):
    return _control(request, pk, lambda b: services.do_resume_batch(b, request.user, request))


@login_required
@require_POST
def batch_cancel(request, pk):
    cancel_running = bool(request.POST.get("cancel_running"))
    return _control(
        request,
        pk,
        lambda b: services.do_cancel_batch(b, request.user, cancel_running=cancel_running, request=request),
    )


@login_required
@require_POST
def batch_move_back(request, pk):
    """Plan the reverse of an evacuation and start it (the new batch's page)."""
    return _control(request, pk, lambda b: services.do_move_back(b, request.user, request))

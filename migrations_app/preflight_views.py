"""The preflight dry run: pick a VM, a target and a mode, see the checklist.

GET /migrations/preflight/?vm=PK&target=PK&mode=live[&options...]
An htmx request (the wizard's "Re-run checks", or its target/mode change) gets the
checklist partial; a plain request gets the full dry-run page (operators use it alone).
"""

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET

from hosts.models import VM, Host
from kvmweb.access import get_scoped_or_404, require, scoped
from migrations_app.masking import HostMask
from migrations_app.models import MigrationJob
from migrations_app.plan import DEFAULTS, MigrationPlan, PlanError
from migrations_app.policy import refused_options
from migrations_app.preflight import run_preflight
from migrations_app.signals import announce


def _pk(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Http404 from None


@login_required
@require_GET
def preflight_check(request):
    """Run the checklist for the plan in the query string (read-only: nothing moves)."""
    perm = "migrations_app.add_migrationjob"
    context = {
        "modes": MigrationJob.MODES,
        "mode": request.GET.get("mode") or MigrationJob.LIVE,
        "options": {},
        "vms": scoped(VM, request.user).filter(gone=False).select_related("host"),
        "targets": scoped(Host, request.user),
    }
    if not (request.GET.get("vm") and request.GET.get("target")):
        require(request.user, perm)
    else:
        # Scope first (out of scope: 404), then the right to migrate (403).
        vm = get_scoped_or_404(VM, request.user, "migrate", perm=perm, pk=_pk(request.GET["vm"]))
        target = get_scoped_or_404(Host, request.user, "migrate", perm=perm, pk=_pk(request.GET["target"]))
        options = {k: v for k, v in request.GET.items() if k in DEFAULTS}
        # The wizard re-runs through here too (htmx) and needs the ack/override inputs;
        # the dry-run page (and its own re-run button, marked dry_run=1) shows none.
        dry_run = not request.htmx or request.GET.get("dry_run") == "1"
        rerun_url = request.get_full_path()
        if dry_run and "dry_run" not in request.GET:
            rerun_url += "&dry_run=1"
        context.update(vm=vm, target=target, options=options, rerun_url=rerun_url, dry_run=dry_run)
        refused = refused_options(request.user, options)
        if refused:
            context["error"] = refused
        elif vm.host is None or vm.gone:
            context["error"] = _("%(vm)s is not on any known host; sync the inventory first.") % {
                "vm": vm.name
            }
        else:
            try:
                # Option combinations libvirt refuses show up as the "Migration options" check.
                plan = MigrationPlan.for_vm(vm, target, context["mode"], options)
            except PlanError as exc:
                context["error"] = str(exc)
            else:
                context["options"] = plan.options
                report = run_preflight(plan)
                announce(report, "dry_run")  # counted by the API's metrics
                subject = HostMask.subject(plan.source, plan.target)
                context["report"] = HostMask.for_user(request.user).report(report, subject)
    if request.htmx:
        if "report" not in context:
            return render(request, "migrations_app/partials/preflight_error.html", context, status=400)
        return render(request, "migrations_app/partials/checklist.html", context)
    return render(
        request, "migrations_app/preflight.html", context, status=400 if context.get("error") else 200
    )

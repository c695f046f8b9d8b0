"""The approval queue: self-service requests that wait for an operator.

Approving starts the job (the backend's do_approve_job queues it); rejecting needs a
reason, which the requester sees on their job. Both go through the job services, which
re-check the job's state under a lock, so two operators clicking at once cannot both win.
"""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from kvmweb.access import get_scoped_or_404, require, scoped
from migrations_app import services
from migrations_app.models import MigrationJob
from migrations_app.policy_forms import RejectForm

PERM = "migrations_app.approve_migrationjob"


@login_required
def queue(request):
    require(request.user, PERM)
    jobs = (
        scoped(MigrationJob, request.user, "approve")
        .filter(status=MigrationJob.PENDING_APPROVAL)
        .select_related("vm", "source", "target", "requested_by")
        .order_by("created_at", "id")
    )
    jobs = list(jobs)
    for job in jobs:
        # Only what the requester set or what differs from "off": defaults are noise here.
        job.options_shown = {k: v for k, v in (job.options or {}).items() if v not in (None, False, "")}
    decided = (
        scoped(MigrationJob, request.user)
        .filter(approved_by__isnull=False)
        .select_related("approved_by")
        .order_by("-id")[:20]
    )
    return render(
        request,
        "migrations_app/approvals.html",
        {"jobs": jobs, "decided": decided, "reject_form": RejectForm()},
    )


@login_required
@require_POST
def approve(request, pk):
    job = get_scoped_or_404(MigrationJob, request.user, "approve", perm=PERM, pk=pk)
    try:
        services.do_approve_job(job, request.user, request=request)
    except services.JobError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("Job #%(id)d approved; it starts now.") % {"id": job.pk})
    return redirect("migrations:approvals")


@login_required
@require_POST
def reject(request, pk):
    job = get_scoped_or_404(MigrationJob, request.user, "approve", perm=PERM, pk=pk)
    form = RejectForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Give a reason for the rejection; the requester will see it."))
        return redirect("migrations:approvals")
    try:
        services.do_reject_job(job, request.user, form.cleaned_data["reason"], request=request)
    except services.JobError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("Job #%(id)d rejected.") % {"id": job.pk})
    return redirect("migrations:approvals")

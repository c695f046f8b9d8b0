"""Migration pages: the wizard, the job list, the job page and its controls.

Thin views: access helper (scope → 404, capability → 403), one service call, redirect or
render. The wizard keeps its state in the query string (VM → target → mode and options →
preflight and confirm) and creates the job with one POST; the database's one-active-job
constraint turns a double click or two browsers into one job.
"""

import json
import time

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from hosts.models import VM, Host
from hosts.services import refresh_vm_state
from kvmweb.access import get_scoped_or_404, require, scoped
from migrations_app import services
from migrations_app import wizard as wizard_help
from migrations_app.forms import BandwidthForm, DowntimeForm, OptionsForm
from migrations_app.masking import HostMask
from migrations_app.models import JobEvent, LeftCopy, MigrationJob

ADD = "migrations_app.add_migrationjob"
# The checklist the user read (and acknowledged) on the confirm step is the one the job
# stores, when it is this fresh; the worker runs it again right before starting anyway.
REPORT_MAX_AGE = 120
SESSION_REPORT = "migration_wizard_report"


def _plan_key(vm, target, mode, options):
    return json.dumps([vm.pk, target.pk, mode, options], sort_keys=True, default=str)


def _pk(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Http404 from None


@login_required
def job_list(request):
    jobs = scoped(MigrationJob, request.user)
    status = request.GET.get("status")
    if status in dict(MigrationJob.STATUSES):
        jobs = jobs.filter(status=status)
    return render(
        request,
        "migrations_app/job_list.html",
        {
            "jobs": HostMask.for_user(request.user).jobs(jobs[:200]),
            "statuses": MigrationJob.STATUSES,
            "status": status or "",
        },
    )


@login_required
def job_detail(request, pk):
    from migrations_app.preflight import Report

    job = get_scoped_or_404(MigrationJob, request.user, pk=pk)
    mask = HostMask.for_user(request.user)
    shown = mask.job(job)
    return render(
        request,
        "migrations_app/job_detail.html",
        {
            "job": shown,
            "samples": job.chart_samples(),
            "events": mask.events(JobEvent.objects.filter(job=job), job),
            "report": Report.from_dict(shown.preflight) if job.preflight else None,
            "can_cancel": job.is_cancellable and request.user.has_perm("migrations_app.cancel_migrationjob"),
            "can_control": job.is_controllable
            and request.user.has_perm("migrations_app.control_migrationjob"),
            "bandwidth_form": BandwidthForm(initial={"bandwidth": job.bandwidth or 0}),
            "downtime_form": DowntimeForm(initial={"downtime": job.max_downtime or 300}),
            "can_force_off": job.is_shutting_down and services.may_force_off(request.user, job),
            "retry_query": retry_query(job)
            if job.can_retry and job.vm_id and request.user.has_perm(ADD)
            else "",
        },
    )


def _control_view(request, pk, perm, action):
    job = get_scoped_or_404(MigrationJob, request.user, "control", perm=perm, pk=pk)
    try:
        action(job)
    except services.JobError as exc:
        messages.error(request, str(exc))
    return redirect("migrations:detail", pk=job.pk)


@login_required
@require_POST
def job_cancel(request, pk):
    def cancel(job):
        services.do_cancel_job(job, request.user, request=request)
        messages.success(request, _("Cancel requested."))

    return _control_view(request, pk, "migrations_app.cancel_migrationjob", cancel)


@login_required
@require_POST
def job_bandwidth(request, pk):
    def change(job):
        form = BandwidthForm(request.POST)
        if not form.is_valid():
            raise services.JobError(" ".join(form.errors["bandwidth"]))
        services.do_set_bandwidth(job, form.cleaned_data["bandwidth"], request.user, request=request)
        messages.success(request, _("Bandwidth change requested."))

    return _control_view(request, pk, "migrations_app.control_migrationjob", change)


@login_required
@require_POST
def job_downtime(request, pk):
    def change(job):
        form = DowntimeForm(request.POST)
        if not form.is_valid():
            raise services.JobError(" ".join(form.errors["downtime"]))
        services.do_set_downtime(job, form.cleaned_data["downtime"], request.user, request=request)
        messages.success(request, _("Maximum downtime change requested."))

    return _control_view(request, pk, "migrations_app.control_migrationjob", change)


@login_required
@require_POST
def job_postcopy(request, pk):
    def switch(job):
        services.do_switch_postcopy(job, request.user, request=request)
        messages.success(request, _("Switch to post-copy requested."))

    return _control_view(request, pk, "migrations_app.control_migrationjob", switch)


@login_required
@require_POST
def job_force_off(request, pk):
    """ "Force off now" on a cold move waiting for its guest to shut down."""
    job = get_scoped_or_404(MigrationJob, request.user, "control", pk=pk)
    if not services.may_force_off(request.user, job):
        raise PermissionDenied
    try:
        services.do_force_off_now(job, request.user, request=request)
        messages.success(request, _("Force off requested: the guest is switched off at once."))
    except services.JobError as exc:
        messages.error(request, str(exc))
    return redirect("migrations:detail", pk=job.pk)


def retry_query(job):
    """The wizard's query string for "Try again with …": the job's VM, target, mode and
    options, with force off checked when the job failed waiting for a shutdown."""
    from urllib.parse import urlencode

    params = {"vm": job.vm_id, "target": job.target_id or "", "mode": job.mode, "retry": job.pk}
    return urlencode(params)


def _retry_initial(request, vm, mode):
    """Initial options of the wizard's options step from the job given as ?retry=N (in the
    user's scope, same VM), else the defaults."""
    initial = {"mode": mode, "start_on_target": vm.is_running}
    pk = request.GET.get("retry")
    if not pk:
        return initial
    job = scoped(MigrationJob, request.user).filter(pk=_pk(pk), vm=vm).first()
    if job is None:
        return initial
    initial.update(job.options or {})
    initial["mode"] = mode
    steps = {(e.get("step"), e.get("state")) for e in job.journal or []}
    if (
        job.mode == MigrationJob.COLD
        and ("shutdown", "started") in steps
        and ("shutdown", "done") not in steps
    ):
        initial["force_off"] = True  # it ended while waiting for the guest to shut down
    return initial


@login_required
def wizard(request):
    """VM → target → mode and options → preflight + confirm (GET); create the job (POST)."""
    require(request.user, ADD)
    if request.method == "POST":
        return _wizard_create(request)
    data = request.GET
    if not data.get("vm"):
        vms = scoped(VM, request.user).filter(gone=False, host__isnull=False).select_related("host")
        return render(request, "migrations_app/wizard.html", {"step": "vm", "vms": vms})
    vm = get_scoped_or_404(VM, request.user, "migrate", pk=_pk(data["vm"]))
    if vm.host is None or vm.gone:
        messages.error(
            request, _("%(vm)s is not on any known host; sync the inventory first.") % {"vm": vm.name}
        )
        return redirect("migrations:new")
    if not data.get("mode") or data.get("step") != "preflight":
        refresh_vm_state(vm)  # the defaults below follow the VM's state now, not the last sync
    choices = wizard_help.mode_choices(request.user, vm)
    mode = data.get("mode") or ""
    if data.get("step") != "preflight":
        mode = wizard_help.fitting_mode(choices, mode, vm)  # never Live for a shut-off VM
    context = {"vm": vm, "mode": mode or wizard_help.default_mode(vm), "mode_choices": choices}
    if not data.get("target"):
        from migrations_app.preflight import rank_targets

        ranked = rank_targets(vm, context["mode"], {}, request.user)
        return render(
            request,
            "migrations_app/wizard.html",
            dict(
                context,
                step="target",
                ranked=ranked,
                no_target_help=wizard_help.no_target_help(request.user, vm),
            ),
        )
    target = get_scoped_or_404(Host, request.user, "migrate", pk=_pk(data["target"]))
    context["target"] = target
    if data.get("step") != "preflight":
        form = OptionsForm(initial=_retry_initial(request, vm, context["mode"]))
        return render(request, "migrations_app/wizard.html", dict(context, step="options", form=form))
    form = OptionsForm(data)
    if not form.is_valid():
        return render(
            request, "migrations_app/wizard.html", dict(context, step="options", form=form), status=400
        )
    return _wizard_preflight(request, vm, target, form.cleaned_data["mode"], form.options())


def _wizard_preflight(request, vm, target, mode, options, *, error="", status=200, ack=(), override=()):
    from migrations_app.plan import MigrationPlan, PlanError
    from migrations_app.policy import refused_options
    from migrations_app.preflight import run_preflight
    from migrations_app.signals import announce

    context = {"step": "preflight", "vm": vm, "target": target, "mode": mode, "error": error}
    try:
        refused = refused_options(request.user, options)
        if refused:  # before the checklist measures anything the options name
            raise PlanError(refused)
        plan = MigrationPlan(vm, vm.host, target, mode, options)
        plan.validate()
    except PlanError as exc:
        form = OptionsForm(initial=dict(options, mode=mode))
        context.update(
            step="options", form=form, error=str(exc), mode_choices=wizard_help.mode_choices(request.user, vm)
        )
        return render(request, "migrations_app/wizard.html", context, status=400)
    report = run_preflight(plan)  # libvirt, through the gateway's timeouts; no transaction open
    announce(report, "wizard")  # counted by the API's metrics (api/apps.py)
    request.session[SESSION_REPORT] = {
        "key": _plan_key(vm, target, mode, plan.options),
        "at": time.time(),
        "report": report.to_dict(),
    }
    mask, subject = HostMask.for_user(request.user), HostMask.subject(vm.host, target)
    decision = services.check_can_request_quietly(request.user, vm, target, mode, plan.options)
    context.update(
        plan=plan,
        needs_approval=bool(decision is not None and decision.needs_approval),
        virsh=mask.text(plan.virsh_command(), subject),
        report=mask.report(report, subject),
        options_json=json.dumps(plan.options),
        mode_label=dict(MigrationJob.MODES)[mode],
        acknowledged=list(ack),
        overridden=list(override),
    )
    return render(request, "migrations_app/wizard.html", context, status=status)


def _wizard_create(request):
    vm = get_scoped_or_404(VM, request.user, "migrate", pk=_pk(request.POST.get("vm")))
    target = get_scoped_or_404(Host, request.user, "migrate", pk=_pk(request.POST.get("target")))
    mode = request.POST.get("mode", "")
    try:
        options = json.loads(request.POST.get("options") or "{}")
        if not isinstance(options, dict):
            raise ValueError
    except ValueError:
        options = {}
    ack, override = request.POST.getlist("ack"), request.POST.getlist("override")
    report = _seen_report(request, vm, target, mode, options)
    try:
        job = services.do_create_job(
            vm,
            target,
            mode,
            options,
            actor=request.user,
            request=request,
            acknowledged=ack,
            overridden=override,
            report=report,
            recheck=True,
            reason=request.POST.get("reason", "")[:2000],
            not_before=request.POST.get("not_before") or None,
            not_after=request.POST.get("not_after") or None,
            ignore_blackouts=bool(request.POST.get("ignore_blackouts")),
        )
    except services.JobError as exc:
        if (
            exc.active_job is not None
            and scoped(MigrationJob, request.user).filter(pk=exc.active_job.pk).exists()
        ):
            messages.warning(request, str(exc))
            return redirect("migrations:detail", pk=exc.active_job.pk)
        return _wizard_preflight(
            request, vm, target, mode, options, error=str(exc), status=400, ack=ack, override=override
        )
    if job.status == MigrationJob.PENDING_APPROVAL:
        messages.info(request, _("Your request waits for an operator's approval."))
    return redirect("migrations:detail", pk=job.pk)


def _seen_report(request, vm, target, mode, options):
    """The report shown on the confirm step for exactly this plan, if recent; else None
    (do_create_job then runs the checklist again)."""
    from migrations_app.preflight import Report

    seen = request.session.get(SESSION_REPORT) or {}
    if seen.get("key") != _plan_key(vm, target, mode, options):
        return None
    if time.time() - seen.get("at", 0) > REPORT_MAX_AGE:
        return None
    return Report.from_dict(seen["report"])


@login_required
@require_POST
def left_copy_delete(request, pk):
    copy = get_scoped_or_404(LeftCopy, request.user, "delete", perm="migrations_app.delete_leftcopy", pk=pk)
    try:
        services.do_delete_left_copy(copy, request.user, request=request)
        messages.success(
            request, _("Deleted %(path)s on %(host)s.") % {"path": copy.path, "host": copy.host_name}
        )
    except services.JobError as exc:
        messages.error(request, str(exc))
    return redirect("hosts:vm_detail", pk=copy.vm_id)

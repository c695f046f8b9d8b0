"""The REST API, /api/v1/ (docs/api.md).

Every view follows the pages' rule with the same helpers: scope first (the model's
``restrict(user, action)``: outside it is a 404), then the capability (a 403), then one
service call, which writes the audit event. Nothing here changes a row by itself.
Anonymous requests get a 401 with ``WWW-Authenticate: Bearer``.
"""

from django.http import Http404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from api import serializers as s
from api.idempotency import idempotent
from api.metrics import observe_preflight
from fleet import services as fleet_services
from fleet.models import Batch
from hosts import services as host_services
from hosts.models import VM, Host, HostGroup
from kvmweb.access import get_scoped_or_404, require, scoped
from kvmweb.audit.forms import AuditFilterForm
from kvmweb.audit.models import AuditEvent
from migrations_app import services as job_services
from migrations_app.masking import HostMask
from migrations_app.models import JobEvent, MigrationJob

ADD_JOB = "migrations_app.add_migrationjob"
APPROVE = "migrations_app.approve_migrationjob"
AUDIT = "audit.view_auditevent"


def _pk(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Http404 from None


def _valid(serializer_class, request):
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class ListView(ListAPIView):
    """A paginated list of a scoped queryset (``get_queryset`` applies scope and filters)."""


# --------------------------------------------------------------------------- index


class IndexView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        """Where everything is."""
        return Response(
            {
                "hosts": reverse("api:host_list"),
                "vms": reverse("api:vm_list"),
                "preflight": reverse("api:preflight"),
                "jobs": reverse("api:job_list"),
                "approvals": reverse("api:approval_list"),
                "audit": reverse("api:audit_list"),
                "schema": reverse("api:schema"),
                "docs": reverse("api:docs"),
                "user": request.user.get_username(),
            }
        )


# --------------------------------------------------------------------------- hosts


def _host_group(request, value):
    if value in (None, ""):
        return None
    group = scoped(HostGroup, request.user).filter(pk=_pk(value)).first()
    if group is None:
        raise ValidationError({"group": "No such host group."})
    return group


class HostListView(ListView):
    serializer_class = s.HostSerializer

    def get_queryset(self):
        """Hosts in your scope."""
        return scoped(Host, self.request.user).select_related("group").order_by("name")

    def get(self, request, *args, **kwargs):
        """Hosts in your scope."""
        return super().get(request, *args, **kwargs)

    @extend_schema(request=s.HostWriteSerializer, responses={201: s.HostSerializer})
    @idempotent
    def post(self, request):
        """Register a host (administrators). It is probed and its VMs synced at once."""
        require(request.user, "hosts.add_host")
        data = _valid(s.HostWriteSerializer, request)
        try:
            host = host_services.do_register_host(
                data["name"],
                data["uri"],
                group=_host_group(request, data.get("group")),
                description=data.get("description", ""),
                actor=request.user,
                request=request,
            )
        except host_services.HostError as exc:
            return Response({"detail": str(exc)}, status=400)
        response = Response(s.HostSerializer(host, context={"request": request}).data, status=201)
        response["Location"] = reverse("api:host_detail", kwargs={"pk": host.pk})
        return response


class HostDetailView(APIView):
    @extend_schema(responses=s.HostSerializer)
    def get(self, request, pk):
        """One host."""
        return Response(
            s.HostSerializer(get_scoped_or_404(Host, request.user, pk=pk), context={"request": request}).data
        )

    @extend_schema(request=s.HostPatchSerializer, responses=s.HostSerializer)
    def patch(self, request, pk):
        """Change a host's name, URI, group or description (administrators)."""
        host = get_scoped_or_404(Host, request.user, "change", perm="hosts.change_host", pk=pk)
        data = _valid(s.HostPatchSerializer, request)
        group = _host_group(request, data["group"]) if "group" in data else host.group
        try:
            host_services.do_update_host(
                host,
                name=data.get("name", host.name),
                uri=data.get("uri", host.uri),
                group=group,
                description=data.get("description", host.description),
                actor=request.user,
                request=request,
            )
        except host_services.HostError as exc:
            return Response({"detail": str(exc)}, status=400)
        return Response(s.HostSerializer(host, context={"request": request}).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk):
        """Forget a host (administrators); its VMs are kept, marked gone."""
        host = get_scoped_or_404(Host, request.user, "delete", perm="hosts.delete_host", pk=pk)
        host_services.do_remove_host(host, actor=request.user, request=request)
        return Response(status=204)


class HostSyncView(APIView):
    @extend_schema(request=None, responses=OpenApiTypes.OBJECT)
    @idempotent
    def post(self, request, pk):
        """Probe the host and sync its VMs now. ``error`` is set when it was unreachable."""
        host = get_scoped_or_404(Host, request.user, "sync", perm="hosts.sync_host", pk=pk)
        summary = host_services.do_sync_inventory(host, actor=request.user, request=request)
        return Response(
            {
                "host": host.pk,
                "error": summary["error"],
                "added": [str(vm) for vm in summary["added"]],
                "moved": [str(vm) for vm in summary["moved"]],
                "gone": [str(vm) for vm in summary["gone"]],
                "updated": summary["updated"],
            }
        )


# --------------------------------------------------------------------------- VMs


class VMListView(ListView):
    serializer_class = s.VMSerializer

    @extend_schema(
        parameters=[
            OpenApiParameter("q", str, description="name contains"),
            OpenApiParameter("host", int),
            OpenApiParameter("state", str),
            OpenApiParameter("gone", bool, description="include VMs no host has any more"),
        ]
    )
    def get(self, request, *args, **kwargs):
        """VMs in your scope, filtered."""
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        vms = scoped(VM, self.request.user).select_related("host", "owner_user", "owner_group")
        params = self.request.query_params
        if params.get("gone") not in ("1", "true", "yes"):
            vms = vms.filter(gone=False)
        if params.get("q"):
            vms = vms.filter(name__icontains=params["q"])
        if params.get("host"):
            vms = vms.filter(host_id=_pk(params["host"]))
        if params.get("state"):
            vms = vms.filter(state=params["state"])
        return vms.order_by("name", "id")


class VMDetailView(APIView):
    @extend_schema(responses=s.VMSerializer)
    def get(self, request, pk):
        """One VM."""
        vm = get_scoped_or_404(VM, request.user, pk=pk)
        return Response(s.VMSerializer(vm).data)


class HostMaintenanceView(APIView):
    @extend_schema(request=s.MaintenanceSerializer, responses=s.HostSerializer)
    def post(self, request, pk):
        """Put the host in maintenance (never a migration target then) or take it out."""
        host = get_scoped_or_404(Host, request.user, perm=fleet_services.PERM, pk=pk)
        body = s.MaintenanceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        host = host_services.do_set_maintenance(
            host,
            body.validated_data["on"],
            reason=body.validated_data["reason"],
            actor=request.user,
            request=request,
        )
        return Response(s.HostSerializer(host, context={"request": request}).data)


class HostEvacuateView(APIView):
    @extend_schema(request=s.EvacuateSerializer, responses={200: dict, 202: s.BatchSerializer})
    def post(self, request, pk):
        """Plan the evacuation of the host (the full preflight for every VM); with
        ``dry_run`` false, start it as a batch (202 with the batch's URL)."""
        host = get_scoped_or_404(Host, request.user, perm=fleet_services.PERM, pk=pk)
        body = s.EvacuateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        limits = {k: data[k] for k in ("max_parallel", "per_source", "per_target")}
        try:
            plan = fleet_services.plan_evacuation(
                host, request.user, allow_cold=data["allow_cold"], limits=limits
            )
            if data["dry_run"]:
                # The plan's checklists name hosts by URI: masked like every page.
                mask = HostMask.for_user(request.user)
                return Response(mask.about_hosts(plan.to_dict(), Host.objects.all()))
            batch = fleet_services.do_create_batch(
                plan, request.user, host=host, stop_on_failure=data["stop_on_failure"], request=request
            )
        except fleet_services.BatchError as exc:
            return Response({"detail": str(exc)}, status=409)
        response = Response(s.BatchSerializer(batch).data, status=202)
        response["Location"] = reverse("api:batch_detail", kwargs={"pk": batch.pk})
        return response


class VMPowerView(APIView):
    @extend_schema(request=s.PowerSerializer, responses={200: s.VMSerializer, 409: s.DetailSerializer})
    def post(self, request, pk):
        """Start, shut down (ACPI), force off or reboot the VM (the VM page's power actions)."""
        vm = get_scoped_or_404(VM, request.user, "power", perm="hosts.power_vm", pk=pk)
        body = s.PowerSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            vm = host_services.do_vm_power(request.user, vm, body.validated_data["action"], request=request)
        except host_services.PowerError as exc:
            return Response({"detail": str(exc)}, status=409)
        return Response(s.VMSerializer(vm).data)


# --------------------------------------------------------------------------- preflight


def _plan_objects(request, data):
    """The VM and target of a plan, each within the user's scope (else 404)."""
    vm = get_scoped_or_404(VM, request.user, "migrate", pk=data["vm"])
    target = get_scoped_or_404(Host, request.user, "migrate", pk=data["target"])
    return vm, target


class PreflightView(APIView):
    @extend_schema(request=s.PreflightRequestSerializer, responses=OpenApiTypes.OBJECT)
    @idempotent
    def post(self, request):
        """Dry run: the checklist for a plan, the same report as ``manage.py preflight --json``
        (docs/preflight.md). Nothing moves; nothing is written."""
        from migrations_app import preflight
        from migrations_app.plan import MigrationPlan, PlanError
        from migrations_app.policy import refused_options

        data = _valid(s.PreflightRequestSerializer, request)
        vm = get_scoped_or_404(VM, request.user, "migrate", perm=ADD_JOB, pk=data["vm"])
        target = get_scoped_or_404(Host, request.user, "migrate", perm=ADD_JOB, pk=data["target"])
        refused = refused_options(request.user, data["options"])
        if refused:  # before the checklist measures anything the options name
            return Response({"detail": refused}, status=403)
        if vm.host is None or vm.gone:
            return Response({"detail": f"{vm.name} is not on any known host; sync the inventory first."}, 400)
        try:
            plan = MigrationPlan.for_vm(vm, target, data["mode"], data["options"])
        except PlanError as exc:
            return Response({"detail": str(exc)}, status=400)
        report = preflight.run_preflight(plan, measure_dirty_rate=not data["quick"])
        observe_preflight(report, source="api")  # never raises
        return Response(report.to_dict())


# --------------------------------------------------------------------------- jobs


def _job_response(request, job, code, serializer=s.JobSerializer):
    response = Response(serializer(job, context={"request": request}).data, status=code)
    response["Location"] = reverse("api:job_detail", kwargs={"pk": job.pk})
    return response


def _job_error(request, exc):
    body = {"detail": str(exc)}
    active = getattr(exc, "active_job", None)
    if active is not None and scoped(MigrationJob, request.user).filter(pk=active.pk).exists():
        body["job"] = reverse("api:job_detail", kwargs={"pk": active.pk})
        return Response(body, status=409)
    report = getattr(exc, "report", None)
    if report is not None:
        body["preflight"] = report.to_dict()
    return Response(body, status=400)


class JobListView(ListView):
    serializer_class = s.JobSerializer

    @extend_schema(parameters=[OpenApiParameter("status", str), OpenApiParameter("vm", int)])
    def get(self, request, *args, **kwargs):
        """Migration jobs in your scope, newest first."""
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        jobs = scoped(MigrationJob, self.request.user)
        params = self.request.query_params
        if params.get("status"):
            jobs = jobs.filter(status=params["status"])
        if params.get("vm"):
            jobs = jobs.filter(vm_id=_pk(params["vm"]))
        return jobs.order_by("-created_at", "-id")

    @extend_schema(request=s.JobCreateSerializer, responses={202: s.JobSerializer})
    @idempotent
    def post(self, request):
        """Request a migration: the same service as the wizard (policy, preflight, one
        active job per VM, approval when the policy asks). 202 + the job's URL; follow it
        (its progress fields and events/; the WebSocket streams are for signed-in browsers). Send an ``Idempotency-Key`` to retry safely."""
        require(request.user, ADD_JOB)
        data = _valid(s.JobCreateSerializer, request)
        vm, target = _plan_objects(request, data)
        try:
            job = job_services.do_create_job(
                vm,
                target,
                data["mode"],
                data["options"],
                actor=request.user,
                request=request,
                acknowledged=data["acknowledged"],
                overridden=data["overridden"],
                reason=data["reason"],
                not_before=data["not_before"],
                not_after=data["not_after"],
                ignore_blackouts=data["ignore_blackouts"],
            )
        except job_services.JobError as exc:
            return _job_error(request, exc)
        return _job_response(request, job, 202)


class JobDetailView(APIView):
    @extend_schema(responses=s.JobDetailSerializer)
    def get(self, request, pk):
        """One job, with its stored preflight report."""
        job = get_scoped_or_404(MigrationJob, request.user, pk=pk)
        return Response(s.JobDetailSerializer(job, context={"request": request}).data)


class JobEventsView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("after", int, description="only events with a larger id")],
        responses=s.JobEventSerializer(many=True),
    )
    def get(self, request, pk):
        """The job's event log (oldest first; ``after`` to poll for new lines)."""
        job = get_scoped_or_404(MigrationJob, request.user, pk=pk)
        events = JobEvent.objects.filter(job=job)
        if request.query_params.get("after"):
            events = events.filter(id__gt=_pk(request.query_params["after"]))
        return Response(
            s.JobEventSerializer(
                events.order_by("id")[:1000], many=True, context={"request": request, "job": job}
            ).data
        )


def _act(request, model, pk, action, *, scope="view", perm, refusal, respond):
    """Act on one object: fetch it in the user's scope (404) with the permission (403), run
    the service ``action(obj)``; the service's refusal (an exception of class ``refusal``,
    e.g. a job that already ended) is a 409 with its message, else ``respond(obj)``."""
    obj = get_scoped_or_404(model, request.user, scope, perm=perm, pk=pk)
    try:
        obj = action(obj)
    except refusal as exc:
        return Response({"detail": str(exc)}, status=409)
    return respond(obj)


def _job_action(request, pk, perm, action, action_kind="control"):
    return _act(
        request,
        MigrationJob,
        pk,
        action,
        scope=action_kind,
        perm=perm,
        refusal=job_services.JobError,
        respond=lambda job: _job_response(request, job, 202),
    )


class JobCancelView(APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer, 409: s.DetailSerializer})
    @idempotent
    def post(self, request, pk):
        """Cancel: a waiting or queued job at once; a running one is aborted by its worker."""
        return _job_action(
            request,
            pk,
            "migrations_app.cancel_migrationjob",
            lambda job: job_services.do_cancel_job(job, request.user, request=request),
        )


class JobBandwidthView(APIView):
    @extend_schema(request=s.BandwidthSerializer, responses={202: s.JobSerializer, 409: s.DetailSerializer})
    @idempotent
    def post(self, request, pk):
        """Change a running live migration's bandwidth cap."""

        def change(job):
            value = _valid(s.BandwidthSerializer, request)["bandwidth"]
            return job_services.do_set_bandwidth(job, value, request.user, request=request)

        return _job_action(request, pk, "migrations_app.control_migrationjob", change)


class JobDowntimeView(APIView):
    @extend_schema(request=s.DowntimeSerializer, responses={202: s.JobSerializer, 409: s.DetailSerializer})
    @idempotent
    def post(self, request, pk):
        """Change a running live migration's maximum downtime."""

        def change(job):
            value = _valid(s.DowntimeSerializer, request)["downtime"]
            return job_services.do_set_downtime(job, value, request.user, request=request)

        return _job_action(request, pk, "migrations_app.control_migrationjob", change)


class JobPostcopyView(APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer, 409: s.DetailSerializer})
    @idempotent
    def post(self, request, pk):
        """Switch a running live migration (with post-copy enabled) to post-copy."""
        return _job_action(
            request,
            pk,
            "migrations_app.control_migrationjob",
            lambda job: job_services.do_switch_postcopy(job, request.user, request=request),
        )


# --------------------------------------------------------------------------- approvals


class ApprovalListView(ListView):
    serializer_class = s.JobSerializer

    def get(self, request, *args, **kwargs):
        """Requests waiting for an operator's approval."""
        require(request.user, APPROVE)
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        jobs = scoped(MigrationJob, self.request.user, "approve").filter(status=MigrationJob.PENDING_APPROVAL)
        return jobs.order_by("created_at", "id")


class ApproveView(APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer, 409: s.DetailSerializer})
    @idempotent
    def post(self, request, pk):
        """Approve a request: the job is queued."""
        return _job_action(
            request,
            pk,
            APPROVE,
            lambda job: job_services.do_approve_job(job, request.user, request=request),
            "approve",
        )


class RejectView(APIView):
    @extend_schema(request=s.RejectSerializer, responses={202: s.JobSerializer, 409: s.DetailSerializer})
    @idempotent
    def post(self, request, pk):
        """Reject a request with a reason the requester sees."""

        def reject(job):
            reason = _valid(s.RejectSerializer, request)["reason"]
            return job_services.do_reject_job(job, request.user, reason, request=request)

        return _job_action(request, pk, APPROVE, reject, "approve")


# --------------------------------------------------------------------------- audit


class AuditListView(ListView):
    serializer_class = s.AuditEventSerializer

    @extend_schema(
        parameters=[
            OpenApiParameter("who", str),
            OpenApiParameter("action", str, description="prefix, e.g. migration."),
            OpenApiParameter("target", str, description="name contains, or type:id (hosts.vm:12)"),
            OpenApiParameter("since", OpenApiTypes.DATE),
            OpenApiParameter("until", OpenApiTypes.DATE),
            OpenApiParameter("outcome", str),
            OpenApiParameter("ip", str),
        ]
    )
    def get(self, request, *args, **kwargs):
        """The audit history, newest first, with the audit page's filters."""
        require(request.user, AUDIT)
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        form = AuditFilterForm(self.request.query_params)
        if self.request.query_params and not form.is_valid():
            errors = {k: v for k, v in form.errors.items() if k in form.fields}
            if errors:
                raise ValidationError(errors)
        return form.filter(scoped(AuditEvent, self.request.user)).order_by("-id")


class AuditDetailView(APIView):
    @extend_schema(responses=s.AuditEventSerializer)
    def get(self, request, pk):
        """One audit event."""
        event = get_scoped_or_404(AuditEvent, request.user, perm=AUDIT, pk=pk)
        return Response(s.AuditEventSerializer(event).data)


# --------------------------------------------------------------------------- batches


class BatchListView(ListView):
    serializer_class = s.BatchSerializer

    def get_queryset(self):
        """Batches (evacuations, bulk moves): the staff roles see them (fleet/models.py)."""
        return scoped(Batch, self.request.user).order_by("-created_at", "-id")


class BatchDetailView(APIView):
    @extend_schema(responses=s.BatchDetailSerializer)
    def get(self, request, pk):
        """One batch with one row per VM (and its job, once started)."""
        batch = get_scoped_or_404(Batch, request.user, pk=pk)
        return Response(s.BatchDetailSerializer(batch).data)


def _batch_action(request, pk, action):
    return _act(
        request,
        Batch,
        pk,
        action,
        perm=fleet_services.PERM,
        refusal=fleet_services.BatchError,
        respond=lambda batch: Response(s.BatchSerializer(batch).data, status=202),
    )


class BatchPauseView(APIView):
    @extend_schema(request=None, responses={202: s.BatchSerializer, 409: s.DetailSerializer})
    def post(self, request, pk):
        """No new children start; running ones finish."""
        return _batch_action(request, pk, lambda b: fleet_services.do_pause_batch(b, request.user, request))


class BatchResumeView(APIView):
    @extend_schema(request=None, responses={202: s.BatchSerializer, 409: s.DetailSerializer})
    def post(self, request, pk):
        """Start children again."""
        return _batch_action(request, pk, lambda b: fleet_services.do_resume_batch(b, request.user, request))


class BatchCancelView(APIView):
    @extend_schema(
        request=s.BatchCancelSerializer, responses={202: s.BatchSerializer, 409: s.DetailSerializer}
    )
    def post(self, request, pk):
        """Cancel the batch; ``cancel_running`` cancels the running children too."""
        body = s.BatchCancelSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        running = body.validated_data["cancel_running"]
        return _batch_action(
            request,
            pk,
            lambda b: fleet_services.do_cancel_batch(
                b, request.user, cancel_running=running, request=request
            ),
        )

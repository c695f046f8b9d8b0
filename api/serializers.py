"""What the API shows of each object: the same fields the pages show to the same people.
Input serializers validate request bodies; the services judge them."""

from django.urls import reverse
from rest_framework import serializers

from fleet.models import Batch, BatchItem
from hosts.models import VM, Host
from kvmweb.audit.models import AuditEvent
from migrations_app.masking import HostMask
from migrations_app.models import JobEvent, MigrationJob


def _mask(serializer):
    """The viewer's mask (migrations_app/masking.py): the API hides exactly what the
    pages hide (URIs from non-administrators, out-of-scope host names in job texts)."""
    request = serializer.context.get("request")
    if request is None:
        raise RuntimeError("API serializers need the request in their context (for masking)")
    return HostMask.for_user(request.user)


class HostSerializer(serializers.ModelSerializer):
    group = serializers.CharField(source="group.name", default=None, read_only=True)
    libvirt_version = serializers.CharField(source="libvirt_version_text", read_only=True)
    hypervisor_version = serializers.CharField(source="hypervisor_version_text", read_only=True)

    class Meta:
        model = Host
        fields = [
            "id",
            "name",
            "uri",
            "group",
            "description",
            "status",
            "last_error",
            "last_probe_at",
            "last_seen_at",
            "last_sync_at",
            "hostname",
            "arch",
            "cpu_model",
            "cpus",
            "memory_total",
            "memory_free",
            "libvirt_version",
            "hypervisor_version",
            "hypervisor_type",
            "maintenance",
            "maintenance_reason",
            "maintenance_since",
        ]
        read_only_fields = fields

    def to_representation(self, host):
        data = super().to_representation(host)
        mask = _mask(self)
        if not mask.sees_uris:
            data["uri"] = None
            data["last_error"] = mask.host_text(host, data["last_error"])
        return data


class HostWriteSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    uri = serializers.CharField(max_length=500)
    group = serializers.IntegerField(required=False, allow_null=True)
    description = serializers.CharField(required=False, allow_blank=True, default="")


class HostPatchSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False)
    uri = serializers.CharField(max_length=500, required=False)
    group = serializers.IntegerField(required=False, allow_null=True)
    description = serializers.CharField(required=False, allow_blank=True)


class VMSerializer(serializers.ModelSerializer):
    host = serializers.SerializerMethodField()
    owner_user = serializers.CharField(source="owner_user.username", default=None, read_only=True)
    owner_group = serializers.CharField(source="owner_group.name", default=None, read_only=True)

    class Meta:
        model = VM
        fields = [
            "id",
            "uuid",
            "name",
            "host",
            "state",
            "state_reason",
            "vcpus",
            "memory",
            "persistent",
            "autostart",
            "machine_type",
            "cpu_mode",
            "cpu_model",
            "gone",
            "owner_user",
            "owner_group",
            "last_seen_at",
        ]
        read_only_fields = fields

    def get_host(self, vm) -> dict | None:
        if vm.host_id is None:
            return None
        return {"id": vm.host_id, "name": vm.host.name}


class JobSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    vm = serializers.SerializerMethodField()
    bandwidth = serializers.IntegerField(read_only=True, allow_null=True)
    max_downtime = serializers.IntegerField(read_only=True, allow_null=True)

    class Meta:
        model = MigrationJob
        fields = [
            "id",
            "url",
            "vm",
            "vm_name",
            "source_name",
            "target_name",
            "mode",
            "options",
            "status",
            "requested_by_name",
            "reason",
            "created_at",
            "started_at",
            "finished_at",
            "phase",
            "percent",
            "data_total",
            "data_processed",
            "data_remaining",
            "rate",
            "dirty_rate",
            "iteration",
            "eta_seconds",
            "bandwidth",
            "max_downtime",
            "cancel_requested",
            "downtime_ms",
            "elapsed_ms",
            "result",
            "error",
            "not_before",
            "not_after",
            "waiting_for",
        ]
        read_only_fields = fields

    def to_representation(self, job):
        return super().to_representation(_mask(self).job(job))

    def get_url(self, job) -> str:
        return reverse("api:job_detail", kwargs={"pk": job.pk})

    def get_vm(self, job) -> int:
        return job.vm_id


class JobDetailSerializer(JobSerializer):
    class Meta(JobSerializer.Meta):
        fields = JobSerializer.Meta.fields + ["preflight", "acknowledged", "overridden"]
        read_only_fields = fields


class JobEventSerializer(serializers.ModelSerializer):
    """A job-log line: ``message`` in English, ``code`` and ``params`` for scripts
    (migrations_app/events.py), masked like the job page."""

    class Meta:
        model = JobEvent
        fields = ["id", "at", "level", "code", "params", "message"]
        read_only_fields = fields

    def to_representation(self, event):
        data = super().to_representation(event)
        mask = _mask(self)
        data["message"] = mask.text(event.message, self.context["job"])
        # Parameters carry host names and libvirt's own words (URIs, key paths) too.
        data["params"] = mask.data(event.params, self.context["job"])
        return data


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "at",
            "actor_name",
            "action",
            "target_type",
            "target_id",
            "target_name",
            "ip",
            "outcome",
            "details",
            "hash",
        ]
        read_only_fields = fields


class PlanSerializer(serializers.Serializer):
    vm = serializers.IntegerField()
    target = serializers.IntegerField()
    mode = serializers.ChoiceField(choices=MigrationJob.MODES)
    options = serializers.DictField(required=False, default=dict)


class PreflightRequestSerializer(PlanSerializer):
    quick = serializers.BooleanField(
        required=False, default=False, help_text="skip the dirty-rate measurement"
    )


class JobCreateSerializer(PlanSerializer):
    acknowledged = serializers.ListField(child=serializers.CharField(), required=False, default=list)
    overridden = serializers.ListField(child=serializers.CharField(), required=False, default=list)
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)
    not_before = serializers.DateTimeField(required=False, allow_null=True, default=None)
    not_after = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="not started by then: ends 'missed window'"
    )
    ignore_blackouts = serializers.BooleanField(
        required=False, default=False, help_text="administrators only"
    )


class MaintenanceSerializer(serializers.Serializer):
    on = serializers.BooleanField()
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class BatchItemSerializer(serializers.ModelSerializer):
    job = serializers.SerializerMethodField()
    status = serializers.CharField(read_only=True)  # plain text: no second "status" enum in the schema

    class Meta:
        model = BatchItem
        fields = ["id", "vm_name", "source_name", "target_name", "mode", "position", "status", "job"]
        read_only_fields = fields

    def get_job(self, item) -> str | None:
        return reverse("api:job_detail", kwargs={"pk": item.job_id}) if item.job_id else None


class BatchSerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True)  # plain text: no second "status" enum in the schema

    class Meta:
        model = Batch
        fields = [
            "id",
            "kind",
            "host_name",
            "status",
            "max_parallel",
            "per_source",
            "per_target",
            "stop_on_failure",
            "not_before",
            "not_after",
            "waiting_for",
            "predicted_seconds",
            "created_by_name",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class BatchDetailSerializer(BatchSerializer):
    items = BatchItemSerializer(many=True, read_only=True)

    class Meta(BatchSerializer.Meta):
        fields = BatchSerializer.Meta.fields + ["items"]
        read_only_fields = fields


class EvacuateSerializer(serializers.Serializer):
    dry_run = serializers.BooleanField(default=True)
    allow_cold = serializers.BooleanField(default=False)
    max_parallel = serializers.IntegerField(min_value=1, max_value=64, default=4)
    per_source = serializers.IntegerField(min_value=1, max_value=64, default=2)
    per_target = serializers.IntegerField(min_value=1, max_value=64, default=2)
    stop_on_failure = serializers.BooleanField(default=False)


class BatchCancelSerializer(serializers.Serializer):
    cancel_running = serializers.BooleanField(default=False)


class PowerSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=["start", "shutdown", "destroy", "reboot"])


class BandwidthSerializer(serializers.Serializer):
    bandwidth = serializers.IntegerField(min_value=0, help_text="MiB/s, 0 = unlimited")


class DowntimeSerializer(serializers.Serializer):
    downtime = serializers.IntegerField(min_value=1, help_text="milliseconds")


class RejectSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000)


class DetailSerializer(serializers.Serializer):
    detail = serializers.CharField()

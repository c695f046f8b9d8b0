"""Hosts (libvirt connections), host groups, VMs and where each VM has been."""

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.accounts.roles import is_self_service, sees_everything
from kvmweb.accounts.scope import check_action


class HostGroupQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for host groups: the staff roles see every group; self-service users
        and outsiders none (they never need the group pages; the policy reason names their
        allowed target groups as text)."""
        check_action(action)
        if not user.is_authenticated or not sees_everything(user):
            return self.none()
        return self


class HostGroup(models.Model):
    """A set of hosts; self-service policies are expressed between host groups."""

    name = models.CharField(_("name"), max_length=100, unique=True)
    description = models.TextField(_("description"), blank=True)

    objects = HostGroupQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


def self_service_target_hosts(user):
    """Hosts a self-service user may pick as migration targets (by policy).

    Returns a subquery of Host primary keys: the hosts of every target group allowed by
    the policies that cover the host groups where the user's (not gone) VMs run now. One
    SQL subquery, so a host list stays one query however many VMs the user owns.
    """
    source_groups = (
        VM.objects.restrict(user).filter(gone=False, host__group__isnull=False).values("host__group")
    )
    target_groups = SelfServicePolicy.objects.filter(source_group__in=source_groups).values("target_groups")
    return Host.objects.filter(group__in=target_groups).values("pk")


class HostQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for hosts. Staff roles see all hosts. A self-service user sees the
        hosts their VMs are on plus the hosts their policy lets them migrate to."""
        check_action(action)
        if not user.is_authenticated:
            return self.none()
        if sees_everything(user):
            return self
        if is_self_service(user):
            own_vms = VM.objects.restrict(user)
            return self.filter(
                Q(pk__in=own_vms.values("host")) | Q(pk__in=self_service_target_hosts(user))
            ).distinct()
        return self.none()


class Host(models.Model):
    """A libvirt host, known by its URI. Facts are refreshed by probing it."""

    UNKNOWN, REACHABLE, UNREACHABLE = "unknown", "reachable", "unreachable"
    STATUSES = [
        (UNKNOWN, _("unknown")),
        (REACHABLE, _("reachable")),
        (UNREACHABLE, _("unreachable")),
    ]

    name = models.CharField(_("name"), max_length=100, unique=True)
    uri = models.CharField(_("libvirt URI"), max_length=500, unique=True)
    group = models.ForeignKey(
        HostGroup, null=True, blank=True, on_delete=models.SET_NULL, related_name="hosts"
    )
    description = models.TextField(_("description"), blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    status = models.CharField(max_length=16, choices=STATUSES, default=UNKNOWN)
    last_error = models.TextField(blank=True)
    last_probe_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    last_sync_at = models.DateTimeField(null=True, blank=True)

    # Facts from the last successful probe.
    hostname = models.CharField(max_length=255, blank=True)
    host_uuid = models.CharField(max_length=64, blank=True)
    arch = models.CharField(max_length=32, blank=True)
    cpu_model = models.CharField(max_length=100, blank=True)
    cpu_vendor = models.CharField(max_length=100, blank=True)
    cpus = models.PositiveIntegerField(null=True, blank=True)
    memory_total = models.BigIntegerField(null=True, blank=True)  # bytes
    memory_free = models.BigIntegerField(null=True, blank=True)  # bytes
    libvirt_version = models.PositiveBigIntegerField(null=True, blank=True)
    hypervisor_version = models.PositiveBigIntegerField(null=True, blank=True)
    hypervisor_type = models.CharField(max_length=32, blank=True)
    migration_transports = models.JSONField(default=list, blank=True)
    # The target's migration port range as its qemu.conf sets it (migration_port_min/max),
    # entered by an administrator: libvirt does not tell it over the API.  Empty: QEMU's
    # default 49152-49215.  The preflight check "migration_ports" probes it (hosts/reach.py).
    migration_port_min = models.PositiveIntegerField(
        _("migration port min"),
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
    )
    migration_port_max = models.PositiveIntegerField(
        _("migration port max"),
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
    )
    pools = models.JSONField(default=list, blank=True)
    networks = models.JSONField(default=list, blank=True)

    # Maintenance mode (hosts.services.do_set_maintenance): a host in maintenance is never
    # offered or accepted as a migration target (preflight check "same_host", rank_targets,
    # migrations_app.policy.allowed_targets, the fleet planner).
    maintenance = models.BooleanField(_("in maintenance"), default=False, db_index=True)
    maintenance_reason = models.CharField(_("maintenance reason"), max_length=500, blank=True)
    maintenance_by = models.CharField(max_length=150, blank=True)
    maintenance_since = models.DateTimeField(null=True, blank=True)

    objects = HostQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        permissions = [
            ("sync_host", "Can probe a host and sync its inventory"),
            ("maintain_host", "Can put a host in maintenance and evacuate it"),
        ]

    def __str__(self):
        return self.name

    @property
    def is_reachable(self):
        return self.status == self.REACHABLE

    @staticmethod
    def version_text(number):
        """libvirt encodes versions as major*1e6 + minor*1e3 + micro."""
        if not number:
            return ""
        return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"

    @property
    def libvirt_version_text(self):
        return self.version_text(self.libvirt_version)

    @property
    def hypervisor_version_text(self):
        return self.version_text(self.hypervisor_version)

    def mark_unreachable(self, error, when):
        self.status = self.UNREACHABLE
        self.last_error = error
        self.last_probe_at = when

    def apply_facts(self, facts, when):
        """Store a probe's facts (a dict from hypervisor.HostConnection.facts())."""
        for field in (
            "hostname",
            "host_uuid",
            "arch",
            "cpu_model",
            "cpu_vendor",
            "cpus",
            "memory_total",
            "memory_free",
            "libvirt_version",
            "hypervisor_version",
            "hypervisor_type",
            "migration_transports",
            "pools",
            "networks",
        ):
            setattr(self, field, facts.get(field, getattr(self, field)))
        self.status = self.REACHABLE
        self.last_error = ""
        self.last_probe_at = when
        self.last_seen_at = when


class VMQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for VMs: staff roles see all; self-service users see the VMs owned
        by them or by one of their groups; anyone else sees nothing."""
        check_action(action)
        if not user.is_authenticated:
            return self.none()
        if sees_everything(user):
            return self
        if is_self_service(user):
            return self.filter(Q(owner_user=user) | Q(owner_group__in=user.groups.all()))
        return self.none()

    # ?sort= keys of the VM list -> the field they order by. Only these are accepted.
    SORTS = {
        "name": "name",
        "state": "state",
        "host": "host__name",
        "vcpus": "vcpus",
        "memory": "memory",
        "owner": "owner_user__username",
    }
    NULLABLE_SORTS = {"host__name", "owner_user__username"}  # VMs without a host or owner

    def sorted_by(self, key):
        """Order by a whitelisted column (``"memory"``, ``"-memory"``); unknown keys sort by
        name. The primary key breaks ties in the same direction, so paging is stable; empty
        values (no host, no owner) come last either way, on SQLite and PostgreSQL alike."""
        descending = key.startswith("-")
        field = self.SORTS.get(key.lstrip("-"), "name")
        if field not in self.NULLABLE_SORTS:
            # Plain ORDER BY: the name index then serves the default order (LIMIT 50
            # reads 50 rows); a NULLS LAST expression would sort all rows every time.
            return self.order_by(f"-{field}", "-pk") if descending else self.order_by(field, "pk")
        expr = models.F(field)
        if descending:
            return self.order_by(expr.desc(nulls_last=True), "-pk")
        return self.order_by(expr.asc(nulls_last=True), "pk")


class VM(models.Model):
    """A libvirt domain, identified by its UUID wherever it runs.

    The row follows the UUID: when the domain shows up on another host (moved by kvmweb or
    by hand) the row keeps its owner and history and gains a VMLocation entry. A domain
    that disappears from every host is marked gone, never deleted.
    """

    RUNNING, PAUSED, SHUTOFF, CRASHED, PMSUSPENDED, BLOCKED, SHUTDOWN, NOSTATE = (
        "running",
        "paused",
        "shutoff",
        "crashed",
        "pmsuspended",
        "blocked",
        "shutdown",
        "nostate",
    )
    STATES = [
        (RUNNING, _("running")),
        (PAUSED, _("paused")),
        (SHUTOFF, _("shut off")),
        (CRASHED, _("crashed")),
        (PMSUSPENDED, _("suspended")),
        (BLOCKED, _("blocked")),
        (SHUTDOWN, _("shutting down")),
        (NOSTATE, _("no state")),
    ]

    uuid = models.UUIDField(unique=True)
    name = models.CharField(max_length=255, db_index=True)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="vms")
    state = models.CharField(max_length=16, choices=STATES, default=NOSTATE, db_index=True)
    state_reason = models.CharField(max_length=64, blank=True)
    # Indexed for the VM list's sort by column (?sort=vcpus / memory): LIMIT 50 then reads
    # 50 index entries instead of sorting every row.
    vcpus = models.PositiveIntegerField(default=0, db_index=True)
    memory = models.BigIntegerField(default=0, db_index=True)  # bytes (maximum memory)
    persistent = models.BooleanField(default=True)
    autostart = models.BooleanField(default=False)
    machine_type = models.CharField(max_length=64, blank=True)
    cpu_mode = models.CharField(max_length=32, blank=True)
    cpu_model = models.CharField(max_length=64, blank=True)
    disks = models.JSONField(default=list, blank=True)
    interfaces = models.JSONField(default=list, blank=True)
    snapshot_count = models.PositiveIntegerField(default=0)
    hostdev_count = models.PositiveIntegerField(default=0)

    gone = models.BooleanField(default=False, db_index=True)
    # Other hosts that hold a definition with the same UUID (a stale copy left by a
    # migration without --undefinesource): starting it there would run the VM twice.
    stale_hosts = models.JSONField(default=list, blank=True)
    first_seen_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    owner_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="owned_vms",
    )
    owner_group = models.ForeignKey(
        Group, null=True, blank=True, on_delete=models.SET_NULL, related_name="owned_vms"
    )

    objects = VMQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = "VM"
        permissions = [("power_vm", "Can start, shut down, force off and reboot a VM")]

    def __str__(self):
        return self.name

    @property
    def is_running(self):
        return self.state in (self.RUNNING, self.PAUSED, self.BLOCKED)

    @property
    def is_shut_off(self):
        return self.state == self.SHUTOFF


class VMLocation(models.Model):
    """One entry of a VM's location trail: it was seen on ``host`` from ``at`` on."""

    vm = models.ForeignKey(VM, on_delete=models.CASCADE, related_name="locations")
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL)
    host_name = models.CharField(max_length=100)
    at = models.DateTimeField()
    via = models.CharField(max_length=32, default="sync")  # sync | migration | gone
    note = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self):
        return f"{self.vm} on {self.host_name} at {self.at}"

"""Batches of migrations (evacuate a host, move back, bulk) and anti-affinity tags.

A Batch owns its child jobs through BatchItem.job: each child is an ordinary
migrations_app.MigrationJob created by migrations_app.services.do_create_job, linked to its
item in the same transaction that creates it (fleet/scheduler.py), so a crash between the
two can never leave a job without its item or an item that starts a second job.
"""

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from kvmweb.accounts.roles import sees_everything
from kvmweb.accounts.scope import check_action


class VMTag(models.Model):
    """An anti-affinity tag on a VM: the planner never places two VMs that share a tag on
    one host (the VMs already on a candidate host count too)."""

    vm = models.ForeignKey("hosts.VM", on_delete=models.CASCADE, related_name="fleet_tags")
    name = models.CharField(_("tag"), max_length=64)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["vm", "name"], name="fleet_vmtag_unique")]

    def __str__(self):
        return f"{self.vm_id}:{self.name}"


class Blackout(models.Model):
    """A window in which no batch child starts on (from or to) a host of ``group``. The
    batch scheduler waits it out (the batch page says until when); an administrator may
    start a batch that ignores blackouts (Batch.ignore_blackouts, audited)."""

    group = models.ForeignKey("hosts.HostGroup", on_delete=models.CASCADE, related_name="blackouts")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=500, blank=True)
    created_by_name = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["starts_at"]

    def __str__(self):
        return f"{self.group} {self.starts_at:%Y-%m-%d %H:%M} - {self.ends_at:%Y-%m-%d %H:%M}"


def blackout_for(host, when):
    """The blackout covering ``host``'s group at ``when``, or None."""
    if host is None or host.group_id is None:
        return None
    return Blackout.objects.filter(group_id=host.group_id, starts_at__lte=when, ends_at__gt=when).first()


def blackout_text(blackout):
    """What a page says about a blackout that holds a migration back."""
    from django.utils.translation import gettext

    return gettext("Blackout of %(g)s until %(t)s%(r)s") % {
        "g": blackout.group.name,
        "t": blackout.ends_at.isoformat(timespec="minutes"),
        "r": f" ({blackout.reason})" if blackout.reason else "",
    }


def blackout_gate():
    """The blackouts as a gate of single jobs (migrations_app/windows.py): a job whose
    source or target is in a group with a blackout now is not claimed by a worker, unless
    an administrator set ``ignore_blackouts`` on it."""
    from django.db.models import Q

    from hosts.models import Host
    from migrations_app.windows import Gate

    def condition(now):
        groups = Blackout.objects.filter(starts_at__lte=now, ends_at__gt=now).values("group_id")
        # Subqueries on the job's own columns, never a join (source__group): a join makes
        # the claim an UPDATE ... WHERE id IN (SELECT ...), which PostgreSQL does not
        # re-check after a concurrent claim, and two workers would both win.
        held = Host.objects.filter(group_id__in=groups).values("pk")
        return Q(ignore_blackouts=True) | (~Q(source_id__in=held) & ~Q(target_id__in=held))

    def blocker(source, target, now):
        blackout = blackout_for(source, now) or blackout_for(target, now)
        return blackout_text(blackout) + "." if blackout else ""

    return Gate("fleet-blackouts", condition, blocker)


class ClaimLock(models.Model):
    """One row (pk 1) that every migration job's claim updates first, inside the claim's
    transaction: on PostgreSQL this serializes the claims, so the batch limits counted in
    the claim's conditional UPDATE are never exceeded by two claims at once
    (fleet/limits.py says why a conditional UPDATE alone is not enough)."""

    claims = models.BigIntegerField(default=0)

    def __str__(self):
        return f"claim lock ({self.claims} claims)"


class BatchQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for batches: the staff roles that see every host and VM see every
        batch; self-service users and people without a role see none (they cannot
        evacuate hosts)."""
        check_action(action)
        if not user.is_authenticated or not sees_everything(user):
            return self.none()
        return self

    def active(self):
        return self.filter(status__in=Batch.ACTIVE_STATES)


class Batch(models.Model):
    """A planned set of migrations run with limits: per batch, per source host (outbound),
    per target host (inbound) and global. The scheduler (fleet/scheduler.py) claims the
    batch with a conditional UPDATE of ``lease_until`` before each pass, so two schedulers
    (the periodic task and a `manage.py evacuate --wait`) never act on it at once."""

    PLANNED, RUNNING, PAUSED, STOPPING, CANCELLING = "planned", "running", "paused", "stopping", "cancelling"
    SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
    STATUSES = [
        (PLANNED, _("planned")),
        (RUNNING, _("running")),
        (PAUSED, _("paused")),
        (STOPPING, _("stopping after a failure")),
        (CANCELLING, _("cancelling")),
        (SUCCEEDED, _("succeeded")),
        (FAILED, _("finished with failures")),
        (CANCELLED, _("cancelled")),
    ]
    ACTIVE_STATES = [RUNNING, PAUSED, STOPPING, CANCELLING]
    FINAL_STATES = [SUCCEEDED, FAILED, CANCELLED]

    EVACUATE, MOVE_BACK, BULK = "evacuate", "move_back", "bulk"
    KINDS = [(EVACUATE, _("evacuate host")), (MOVE_BACK, _("move back")), (BULK, _("bulk migration"))]

    kind = models.CharField(max_length=16, choices=KINDS, default=EVACUATE)
    host = models.ForeignKey("hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    host_name = models.CharField(max_length=100, blank=True)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    status = models.CharField(max_length=16, choices=STATUSES, default=PLANNED, db_index=True)

    max_parallel = models.PositiveIntegerField(default=4)
    per_source = models.PositiveIntegerField(default=2)
    per_target = models.PositiveIntegerField(default=2)
    stop_on_failure = models.BooleanField(default=False)
    cancel_running = models.BooleanField(default=False)  # what "cancel" does to running children
    # Window: no child starts before not_before; children not started by not_after end
    # as "missed window" (fleet/scheduler.py).
    not_before = models.DateTimeField(null=True, blank=True)
    not_after = models.DateTimeField(null=True, blank=True)
    ignore_blackouts = models.BooleanField(default=False)  # administrators only
    waiting_for = models.CharField(max_length=500, blank=True)  # why nothing starts now

    predicted_seconds = models.FloatField(null=True, blank=True)
    plan = models.JSONField(default=dict, blank=True)  # the planner's table as approved

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_name = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    # The scheduler's claim: whoever set lease_until in the future owns the next pass.
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)

    objects = BatchQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"batch #{self.pk} ({self.kind} {self.host_name})".strip()

    @property
    def is_final(self):
        return self.status in self.FINAL_STATES

    def counts(self):
        out = {s: 0 for s, _label in BatchItem.STATUSES}
        for row in self.items.values("status").annotate(n=models.Count("id")):
            out[row["status"]] = row["n"]
        return out


class BatchItem(models.Model):
    """One VM of a batch: where it goes, how, what was predicted, and the child job that
    moves it (set in the same transaction that creates the job)."""

    PENDING, STARTED, SUCCEEDED, FAILED, CANCELLED, SKIPPED, BLOCKED, MISSED = (
        "pending",
        "started",
        "succeeded",
        "failed",
        "cancelled",
        "skipped",
        "blocked",
        "missed",
    )
    STATUSES = [
        (PENDING, _("waiting")),
        (STARTED, _("started")),
        (SUCCEEDED, _("moved")),
        (FAILED, _("failed")),
        (CANCELLED, _("cancelled")),
        (SKIPPED, _("skipped")),
        (BLOCKED, _("stays (blocked)")),
        (MISSED, _("missed window")),
    ]
    OPEN = [PENDING, STARTED]

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="items")
    vm = models.ForeignKey("hosts.VM", on_delete=models.PROTECT, related_name="+")
    vm_name = models.CharField(max_length=255)
    source = models.ForeignKey("hosts.Host", null=True, on_delete=models.SET_NULL, related_name="+")
    source_name = models.CharField(max_length=100)
    target = models.ForeignKey(
        "hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    target_name = models.CharField(max_length=100, blank=True)
    mode = models.CharField(max_length=16, blank=True)
    options = models.JSONField(default=dict, blank=True)
    position = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=STATUSES, default=PENDING, db_index=True)
    reason = models.TextField(blank=True)
    predicted_seconds = models.FloatField(null=True, blank=True)
    predicted_downtime_ms = models.FloatField(null=True, blank=True)
    report = models.JSONField(default=dict, blank=True)  # the planner's preflight report
    # A child lost with its worker (reconcile found the VM still on its source, the
    # migration never done) is retried once: its job is kept in previous_jobs.
    attempts = models.PositiveIntegerField(default=0)
    previous_jobs = models.JSONField(default=list, blank=True)
    job = models.OneToOneField(
        "migrations_app.MigrationJob",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="batch_item",
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["position", "id"]

    def __str__(self):
        return f"{self.vm_name} -> {self.target_name or '?'}"

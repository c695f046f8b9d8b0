"""Migration jobs: one row per requested migration, the single source of truth for its
state and progress. Workers write it; web pages and WebSockets read it."""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from migrations_app import states
from migrations_app.events import COLLAPSING, render
from migrations_app.options import LIVE_MODES

# The journal's steps (migrations_app/journal.py) as the job page names them.
JOURNAL_STEPS = {
    "begin": _("started"),
    "shutdown": _("guest shutdown"),
    "force_off": _("forced off"),
    "storage": _("storage decision"),
    "migrate_definition": _("definition moved"),
    "create_volume": _("target volume created"),
    "copy": _("disk copied"),
    "define": _("defined on the target"),
    "undefine_source": _("removed from the source"),
    "remove_source_disks": _("source disks removed"),
    "start": _("started on the target"),
    "verify": _("verified"),
}


class MigrationJobQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for jobs: staff roles see all; self-service users see jobs of the
        VMs they own; anyone else sees nothing."""
        from hosts.models import VM
        from kvmweb.accounts.roles import is_self_service, sees_everything

        if not user.is_authenticated:
            return self.none()
        if sees_everything(user):
            return self
        if is_self_service(user):
            return self.filter(vm__in=VM.objects.restrict(user))
        return self.none()

    def active(self):
        return self.filter(status__in=MigrationJob.ACTIVE_STATES)


class MigrationJob(models.Model):
    """A migration of one VM from its source host to a target host.

    States: pending_approval -> queued -> preflight -> running -> (cancelling) ->
    succeeded | failed | cancelled; rejected (approval refused); needs_reconcile when the
    worker's heartbeat stopped and nobody knows yet what libvirt did.
    At most one active job per VM, enforced by a conditional unique constraint.
    """

    # The states and their allowed transitions live in migrations_app/states.py; only
    # migrations_app.lifecycle.transition() changes a job's status.
    PENDING_APPROVAL = states.PENDING_APPROVAL
    QUEUED = states.QUEUED
    PREFLIGHT = states.PREFLIGHT
    RUNNING = states.RUNNING
    CANCELLING = states.CANCELLING
    SUCCEEDED = states.SUCCEEDED
    FAILED = states.FAILED
    CANCELLED = states.CANCELLED
    REJECTED = states.REJECTED
    NEEDS_RECONCILE = states.NEEDS_RECONCILE
    STATUSES = [
        (PENDING_APPROVAL, _("waiting for approval")),
        (QUEUED, _("queued")),
        (PREFLIGHT, _("preflight")),
        (RUNNING, _("running")),
        (CANCELLING, _("cancelling")),
        (SUCCEEDED, _("succeeded")),
        (FAILED, _("failed")),
        (CANCELLED, _("cancelled")),
        (REJECTED, _("rejected")),
        (NEEDS_RECONCILE, _("needs reconcile")),
    ]
    ACTIVE_STATES = list(states.ACTIVE)
    FINAL_STATES = list(states.FINAL)

    LIVE, LIVE_COPY, COLD, OFFLINE = "live", "live-copy", "cold", "offline"
    MODES = [
        (LIVE, _("Live")),
        (LIVE_COPY, _("Live with storage copy")),
        (COLD, _("Cold")),
        (OFFLINE, _("Offline (definition only)")),
    ]

    vm = models.ForeignKey("hosts.VM", on_delete=models.PROTECT, related_name="jobs")
    vm_name = models.CharField(max_length=255)
    source = models.ForeignKey("hosts.Host", null=True, on_delete=models.SET_NULL, related_name="+")
    source_name = models.CharField(max_length=100)
    target = models.ForeignKey("hosts.Host", null=True, on_delete=models.SET_NULL, related_name="+")
    target_name = models.CharField(max_length=100)
    mode = models.CharField(max_length=16, choices=MODES)
    options = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=STATUSES, default=QUEUED, db_index=True)

    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_name = models.CharField(max_length=150, blank=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField(blank=True)  # why requested / why rejected
    preflight = models.JSONField(default=dict, blank=True)  # the stored checklist report
    acknowledged = models.JSONField(default=list, blank=True)  # warnings acknowledged
    overridden = models.JSONField(default=list, blank=True)  # fails overridden by an admin

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=100, blank=True)

    # Requests from the controls, picked up by the worker loop.
    cancel_requested = models.BooleanField(default=False)
    requested_bandwidth = models.PositiveIntegerField(null=True, blank=True)  # MiB/s
    requested_downtime = models.PositiveIntegerField(null=True, blank=True)  # ms
    postcopy_requested = models.BooleanField(default=False)
    # Cold moves: "Force off now" on a guest that ignores the shutdown request; the
    # shutdown wait (modes/cold.py) sees it within a poll and destroys the domain.
    force_off_requested = models.BooleanField(default=False)
    force_off_requested_by = models.CharField(max_length=150, blank=True)

    # Live progress (written by the worker about four times a second).
    phase = models.CharField(max_length=32, blank=True)
    percent = models.FloatField(default=0)
    data_total = models.BigIntegerField(default=0)
    data_processed = models.BigIntegerField(default=0)
    data_remaining = models.BigIntegerField(default=0)
    memory_total = models.BigIntegerField(default=0)
    memory_processed = models.BigIntegerField(default=0)
    memory_remaining = models.BigIntegerField(default=0)
    disk_total = models.BigIntegerField(default=0)
    disk_processed = models.BigIntegerField(default=0)
    disk_remaining = models.BigIntegerField(default=0)
    rate = models.BigIntegerField(default=0)  # bytes/s
    dirty_rate = models.BigIntegerField(default=0)  # bytes/s
    iteration = models.PositiveIntegerField(default=0)
    eta_seconds = models.FloatField(null=True, blank=True)
    # When the graceful shutdown wait of a cold move ends (stored, so every watcher and a
    # reload count down to the same instant).
    shutdown_deadline = models.DateTimeField(null=True, blank=True)
    progress_at = models.DateTimeField(null=True, blank=True)
    progress_seq = models.PositiveIntegerField(default=0)

    # Final figures (from libvirt's completed-job statistics).
    downtime_ms = models.PositiveIntegerField(null=True, blank=True)
    elapsed_ms = models.PositiveIntegerField(null=True, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    # The error as sentences with codes ([{"code", "params", "en"}], migrations_app/events.py)
    # so each viewer reads it in their language; ``error`` keeps the English text.
    error_parts = models.JSONField(default=list, blank=True)
    # Cold and offline jobs: every step with a side effect, written before ("started")
    # and after ("done") it runs, so a job whose worker died resumes or rolls back from
    # here (see migrations_app/journal.py).
    journal = models.JSONField(default=list, blank=True)

    objects = MigrationJobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [
            ("cancel_migrationjob", "Can cancel a migration"),
            ("control_migrationjob", "Can change bandwidth/downtime/post-copy of a migration"),
            ("approve_migrationjob", "Can approve or reject migration requests"),
            ("override_preflight", "Can override an overridable preflight failure"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(status__in=list(states.ACTIVE)),
                name="one_active_job_per_vm",
            )
        ]

    def __str__(self):
        return f"#{self.pk} {self.vm_name} {self.source_name} -> {self.target_name} ({self.mode})"

    @property
    def is_active(self):
        return self.status in self.ACTIVE_STATES

    @property
    def is_final(self):
        return self.status in self.FINAL_STATES

    @property
    def is_cancellable(self):
        """Waiting, queued, preflight or running jobs can be cancelled."""
        return self.status in states.CANCEL_AT_ONCE + states.CANCEL_THROUGH_WORKER

    @property
    def is_controllable(self):
        """Bandwidth, downtime and post-copy only change a live migration that runs."""
        return self.status == self.RUNNING and self.mode in LIVE_MODES

    @property
    def error_text(self):
        """The error in the active language (its coded sentences), else the stored text."""
        if not self.error_parts:
            return self.error
        return " ".join(render(p.get("code", ""), p.get("params"), p.get("en", "")) for p in self.error_parts)

    @property
    def journal_steps(self):
        """The journal as lines for the job page: [(label, state, detail)], one per step
        (the latest state of each step and disk), in the order the steps began."""
        order, latest = [], {}
        for entry in self.journal or []:
            key = (entry.get("step"), entry.get("path", ""))
            if key not in latest:
                order.append(key)
            latest[key] = entry.get("state", "")
        return [(JOURNAL_STEPS.get(step, step), latest[(step, path)], path) for step, path in order]

    @property
    def is_shutting_down(self):
        """A cold move waiting for the guest to shut down (Force off now applies)."""
        return self.status == self.RUNNING and self.phase == "shutdown" and not self.force_off_requested

    @property
    def can_retry(self):
        """Failed or cancelled: the wizard may be opened again with the same plan."""
        return self.status in (self.FAILED, self.CANCELLED)

    @property
    def postcopy_enabled(self):
        return bool((self.options or {}).get("postcopy")) and self.mode in LIVE_MODES

    @property
    def bandwidth(self):
        """The bandwidth cap in effect (MiB/s; None = unlimited)."""
        if self.requested_bandwidth is not None:
            return self.requested_bandwidth or None
        return (self.options or {}).get("bandwidth")

    @property
    def max_downtime(self):
        return self.requested_downtime or (self.options or {}).get("max_downtime")

    def chart_samples(self, limit=600):
        """The chart's samples, thinned evenly to at most ``limit`` (a long migration
        writes four a second; the page must stay small however long it ran)."""
        rows = list(self.samples.values("t", "rate", "remaining"))
        if len(rows) <= limit:
            return rows
        step = len(rows) / limit
        return [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]]

    @property
    def duration_seconds(self):
        """Seconds from start to finish (or to now while it runs)."""
        if not self.started_at:
            return None
        from django.utils import timezone

        return ((self.finished_at or timezone.now()) - self.started_at).total_seconds()


class ProgressSample(models.Model):
    """One progress sample, kept for the job page's chart."""

    job = models.ForeignKey(MigrationJob, on_delete=models.CASCADE, related_name="samples")
    t = models.FloatField()  # seconds since the job started
    rate = models.BigIntegerField(default=0)
    remaining = models.BigIntegerField(default=0)
    processed = models.BigIntegerField(default=0)
    dirty_rate = models.BigIntegerField(default=0)
    iteration = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["job", "t"]

    def __str__(self):
        return f"job {self.job_id} t={self.t:.2f}s"


class JobEvent(models.Model):
    """A line of a job's event log (phase changes, controls used, libvirt events)."""

    job = models.ForeignKey(MigrationJob, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    level = models.CharField(max_length=8, default="info")  # info | warn | error
    message = models.TextField()  # English text (what older rows and unknown codes show)
    # Worker lines are stored as a code and parameters and rendered in the viewer's
    # language when shown (migrations_app/events.py); ``message`` keeps the English text.
    code = models.CharField(max_length=40, blank=True)
    params = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self):
        return f"job {self.job_id} {self.level}: {self.message[:60]}"

    @property
    def text(self):
        """The line in the active language (code + params), else the stored text."""
        return render(self.code, self.params, self.message)

    @property
    def collapses(self):
        return self.code in COLLAPSING


class LeftCopyQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule for left copies: staff roles only (a copy names a host and a path,
        which self-service users do not see)."""
        from kvmweb.accounts.roles import sees_everything

        if not user.is_authenticated or not sees_everything(user):
            return self.none()
        return self


class LeftCopy(models.Model):
    """A disk file kvmweb left behind on a host after moving a VM away (the source disk
    of a storage copy or cold copy, kept because the user did not ask to remove it).

    It holds the VM's data as it was at the move, so it must never be taken for shared
    storage later: the preflight names the job that left it, and the VM page offers to
    delete it (audited)."""

    vm = models.ForeignKey("hosts.VM", on_delete=models.PROTECT, related_name="left_copies")
    host = models.ForeignKey("hosts.Host", null=True, on_delete=models.SET_NULL, related_name="+")
    host_name = models.CharField(max_length=100)
    path = models.CharField(max_length=4096)
    job = models.ForeignKey(MigrationJob, null=True, on_delete=models.SET_NULL, related_name="left_copies")
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)
    removed_by_name = models.CharField(max_length=150, blank=True)

    objects = LeftCopyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.host_name}:{self.path} (job {self.job_id})"

    @property
    def is_present(self):
        return self.removed_at is None

"""Migration jobs: one row per requested migration, the single source of truth for its
state and progress. Workers write it; web pages and WebSockets read it."""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from hosts.models import VM
from kvmweb.accounts.roles import is_self_service, sees_everything
from kvmweb.accounts.scope import check_action
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
        check_action(action)
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
    # When libvirt's migrate call of a batch child concluded beside the next child's start
    # returned (jobrun.conclude_success): from then on it holds no slot of the limits.
    landed_at = models.DateTimeField(null=True, blank=True)
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
    # Window (migrations_app/windows.py): the worker's claim requires not_before <= now <=
    # not_after; a job not started by not_after ends cancelled as "missed window".
    # waiting_for: why a queued job is held (not queued for a worker until it is due).
    not_before = models.DateTimeField(null=True, blank=True)
    not_after = models.DateTimeField(null=True, blank=True)
    ignore_blackouts = models.BooleanField(default=False)  # administrators only, audited
    waiting_for = models.CharField(max_length=500, blank=True)
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
    def missed_window(self):
        """Ended because it was not started before its window closed."""
        return self.status == self.CANCELLED and bool((self.result or {}).get("missed_window"))

    def _until(self, when):
        from django.utils import timezone

        if when is None or self.status not in (self.QUEUED, self.PENDING_APPROVAL):
            return None
        left = (when - timezone.now()).total_seconds()
        return left if left > 0 else None

    @property
    def opens_in(self):
        """Seconds until the window opens (not started yet), else None."""
        return self._until(self.not_before)

    @property
    def closes_in(self):
        """Seconds until the window closes (not started yet), else None."""
        return self._until(self.not_after)

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
        writes four a second; the page must stay small however long it ran). Samples that
        mark a convergence-ladder step are always kept."""
        rows = list(self.samples.values("t", "rate", "remaining", "mark"))
        if len(rows) <= limit:
            return rows
        step = len(rows) / limit
        kept = {int(i * step) for i in range(limit - 1)} | {len(rows) - 1}
        kept |= {i for i, row in enumerate(rows) if row["mark"]}
        return [rows[i] for i in sorted(kept)]

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
    # A convergence-ladder step taken at this sample ("600 ms", "postcopy", "abort"):
    # drawn as a marker on the chart.
    mark = models.CharField(max_length=40, blank=True, default="")

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
        check_action(action)
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


class MigrationCostSample(models.Model):
    """What one finished live migration cost between two hosts, beyond moving its memory:
    the fixed part of its duration (libvirt's elapsed time minus the bytes moved at
    QEMU's transfer rate: target start-up, device state, handshakes), its downtime, the
    transfer rate itself when it says something about the link (uncapped, alone), and how
    much less the VM sent than its resident memory.
    migrations_app/prediction.py learns per (source, target) from the last ten."""

    source = models.ForeignKey("hosts.Host", on_delete=models.CASCADE, related_name="+")
    target = models.ForeignKey("hosts.Host", on_delete=models.CASCADE, related_name="+")
    job = models.OneToOneField(MigrationJob, null=True, on_delete=models.SET_NULL, related_name="cost_sample")
    created_at = models.DateTimeField(auto_now_add=True)
    elapsed_ms = models.PositiveIntegerField()
    data_bytes = models.BigIntegerField()
    fixed_ms = models.PositiveIntegerField()
    downtime_ms = models.PositiveIntegerField(null=True, blank=True)
    transfer_mibs = models.FloatField(null=True, blank=True)  # None: capped or concurrent
    # The VM's memory the preflight counted (QEMU's resident memory, MiB) minus what the
    # job really moved: QEMU's own memory, not guest RAM. None when the report had no figure.
    vm = models.ForeignKey("hosts.VM", null=True, on_delete=models.SET_NULL, related_name="+")
    overhead_mib = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["source", "target", "-created_at"], name="cost_sample_pair_recent")]

    def __str__(self):
        return f"{self.source_id}->{self.target_id}: fixed {self.fixed_ms} ms"


class DirtyRateSample(models.Model):
    """The last dirty-rate measurement of a VM's guest, shared by every process
    (migrations_app/dirtyrate.py): a checklist in the web server, a `migrate_vm` or
    `preflight` command and an API call within KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE seconds
    reuse it instead of measuring for a second each.

    Keyed by the guest's UUID, not by host: the rate is the guest's workload, which a
    migration does not change, and a VM that just moved keeps its recent figure. Not a
    foreign key, so that a sample outlives a VM row re-created by an inventory sync; old
    rows are harmless (one per VM, overwritten) and ignored once older than the window."""

    vm_uuid = models.CharField(max_length=36, unique=True)
    host_name = models.CharField(max_length=255, blank=True)  # where it was measured
    mib_per_s = models.PositiveIntegerField()
    mode = models.CharField(max_length=32)
    period = models.PositiveIntegerField()
    measured_at = models.DateTimeField()

    def __str__(self):
        return f"{self.vm_uuid}: {self.mib_per_s} MiB/s at {self.measured_at:%Y-%m-%d %H:%M:%S}"

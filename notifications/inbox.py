"""The header's bell: a user's in-app notifications, read from the audit history.

What counts as "for them": their own migration requests that finished (succeeded, failed,
cancelled) or were approved/rejected, and requests waiting for approval when they may
approve. Every item is scoped by the same rule as the pages (MigrationJob.restrict):
a user only hears about jobs they may see. Nothing is stored per notification; the
user's InboxMark says up to which audit event they have read.
"""

from dataclasses import dataclass

from django.utils.translation import gettext as _

from kvmweb.audit.models import AuditEvent

JOB = "migrations_app.migrationjob"
ACTIONS = ("migration.finish", "migration.request", "migration.approve", "migration.reject")
# How far back the bell looks (audit events of the actions above, newest first).
WINDOW = 300


@dataclass(frozen=True)
class Item:
    """One notification as the bell lists it."""

    event_id: int
    at: object
    kind: str  # job.succeeded | job.failed | job.cancelled | approval.requested | approval.decided
    text: str
    url: str
    unread: bool


def _text(kind, job, audit):
    vm = job.vm_name
    if kind == "job.succeeded":
        return _("Migration #%(job)d of %(vm)s succeeded.") % {"job": job.pk, "vm": vm}
    if kind == "job.failed":
        return _("Migration #%(job)d of %(vm)s failed.") % {"job": job.pk, "vm": vm}
    if kind == "job.cancelled":
        return _("Migration #%(job)d of %(vm)s was cancelled.") % {"job": job.pk, "vm": vm}
    if kind == "approval.requested":
        return _("%(user)s asks to migrate %(vm)s (#%(job)d): waiting for your approval.") % {
            "user": audit.actor_name or "-",
            "vm": vm,
            "job": job.pk,
        }
    if audit.action == "migration.approve":
        return _("Your request #%(job)d for %(vm)s was approved.") % {"job": job.pk, "vm": vm}
    return _("Your request #%(job)d for %(vm)s was rejected.") % {"job": job.pk, "vm": vm}


def _kind(audit):
    details = audit.details if isinstance(audit.details, dict) else {}
    if audit.outcome != AuditEvent.SUCCESS and audit.action != "migration.finish":
        return None
    if audit.action == "migration.finish":
        status = details.get("status")
        return f"job.{status}" if status in ("succeeded", "failed", "cancelled") else None
    if audit.action == "migration.request":
        return "approval.requested" if details.get("status") == "pending_approval" else None
    return "approval.decided"


def items(user, limit=10):
    """The user's newest notifications (at most ``limit``), newest first."""
    from migrations_app.models import MigrationJob
    from notifications.models import InboxMark

    if not user.is_authenticated:
        return []
    seen = InboxMark.objects.filter(user=user).values_list("seen_event_id", flat=True).first() or 0
    rows = list(
        AuditEvent.objects.filter(action__in=ACTIONS, target_type=JOB)
        .exclude(actor=user, action__in=("migration.approve", "migration.reject", "migration.request"))
        .order_by("-id")[:WINDOW]
    )
    ids = {int(r.target_id) for r in rows if str(r.target_id).isdigit()}
    jobs = {j.pk: j for j in MigrationJob.objects.restrict(user).filter(pk__in=ids)}
    approver = user.has_perm("migrations_app.approve_migrationjob")
    out = []
    for audit in rows:
        job = jobs.get(int(audit.target_id)) if str(audit.target_id).isdigit() else None
        kind = _kind(audit)
        if job is None or kind is None:
            continue
        if kind == "approval.requested":
            if not approver or job.status != MigrationJob.PENDING_APPROVAL:
                continue
        elif job.requested_by_id != user.pk:
            continue
        out.append(
            Item(audit.pk, audit.at, kind, _text(kind, job, audit), f"/migrations/{job.pk}/", audit.pk > seen)
        )
        if len(out) >= limit:
            break
    return out


def unread_count(found):
    return sum(1 for item in found if item.unread)

"""The header's bell: a user's in-app notifications, read from the audit history.

What counts as "for them": their own migration requests that finished (succeeded, failed,
cancelled) or were approved/rejected, requests waiting for approval when they may
approve, and hosts in their scope that became unreachable or came back (the hosts app
writes a ``host.status`` audit event in the same transaction as the status change, so
the bell needs no hook in hosts). Every item is scoped by the same rule as the pages
(MigrationJob.restrict, Host.restrict): a user only hears about jobs and hosts they may
see. Nothing is stored per notification; the user's InboxMark says up to which audit
event they have read. The bell is pushed live by notifications/live.py.
"""

from dataclasses import dataclass

from django.db.models import Q
from django.utils.translation import gettext as _

from kvmweb.audit.models import AuditEvent

JOB = "migrations_app.migrationjob"
HOST = "hosts.host"
JOB_ACTIONS = ("migration.finish", "migration.request", "migration.approve", "migration.reject")
HOST_ACTIONS = ("host.status",)
ACTIONS = JOB_ACTIONS + HOST_ACTIONS
# Audit actions after which a user's bell may read differently: the above, a request
# leaving "waiting for approval" without a decision (cancelled, its window passed: the
# approvers' item goes), and a "mark read" (another tab of the same user).
LIVE_ACTIONS = ACTIONS + ("migration.cancel", "migration.missed_window", "notifications.read")
# How far back the bell looks (audit events of the actions above, newest first).
WINDOW = 300


@dataclass(frozen=True)
class Item:
    """One notification as the bell lists it."""

    event_id: int
    at: object
    # job.succeeded | job.failed | job.cancelled | approval.requested | approval.decided
    # | host.unreachable | host.back
    kind: str
    text: str
    url: str
    unread: bool


def _text(kind, obj, audit):
    """The line the bell shows; ``obj`` is the job or the host the event is about."""
    if kind == "host.unreachable":
        return _("Host %(host)s is unreachable.") % {"host": obj.name}
    if kind == "host.back":
        return _("Host %(host)s is reachable again.") % {"host": obj.name}
    vm = obj.vm_name
    if kind == "job.succeeded":
        return _("Migration #%(job)d of %(vm)s succeeded.") % {"job": obj.pk, "vm": vm}
    if kind == "job.failed":
        return _("Migration #%(job)d of %(vm)s failed.") % {"job": obj.pk, "vm": vm}
    if kind == "job.cancelled":
        return _("Migration #%(job)d of %(vm)s was cancelled.") % {"job": obj.pk, "vm": vm}
    if kind == "approval.requested":
        return _("%(user)s asks to migrate %(vm)s (#%(job)d): waiting for your approval.") % {
            "user": audit.actor_name or "-",
            "vm": vm,
            "job": obj.pk,
        }
    if audit.action == "migration.approve":
        return _("Your request #%(job)d for %(vm)s was approved.") % {"job": obj.pk, "vm": vm}
    return _("Your request #%(job)d for %(vm)s was rejected.") % {"job": obj.pk, "vm": vm}


def _kind(audit):
    details = audit.details if isinstance(audit.details, dict) else {}
    if audit.action == "host.status":
        if details.get("to") == "unreachable":
            return "host.unreachable"
        if details.get("to") == "reachable" and details.get("from") == "unreachable":
            return "host.back"
        return None  # a first probe (unknown -> reachable) is no news
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
    from hosts.models import Host
    from migrations_app.models import MigrationJob
    from notifications.models import InboxMark

    if not user.is_authenticated:
        return []
    seen = InboxMark.objects.filter(user=user).values_list("seen_event_id", flat=True).first() or 0
    rows = list(
        AuditEvent.objects.filter(
            Q(action__in=JOB_ACTIONS, target_type=JOB) | Q(action__in=HOST_ACTIONS, target_type=HOST)
        )
        .exclude(actor=user, action__in=("migration.approve", "migration.reject", "migration.request"))
        .order_by("-id")[:WINDOW]
    )

    def ids(target_type):
        return {int(r.target_id) for r in rows if r.target_type == target_type and str(r.target_id).isdigit()}

    jobs = {j.pk: j for j in MigrationJob.objects.restrict(user).filter(pk__in=ids(JOB))}
    host_ids = ids(HOST)
    hosts = {h.pk: h for h in Host.objects.restrict(user).filter(pk__in=host_ids)} if host_ids else {}
    approver = user.has_perm("migrations_app.approve_migrationjob")
    out = []
    for audit in rows:
        pk = int(audit.target_id) if str(audit.target_id).isdigit() else None
        kind = _kind(audit)
        if kind is None or pk is None:
            continue
        if audit.target_type == HOST:
            host = hosts.get(pk)
            if host is None:
                continue
            out.append(
                Item(
                    audit.pk, audit.at, kind, _text(kind, host, audit), f"/hosts/{host.pk}/", audit.pk > seen
                )
            )
        else:
            job = jobs.get(pk)
            if job is None:
                continue
            if kind == "approval.requested":
                if not approver or job.status != MigrationJob.PENDING_APPROVAL:
                    continue
            elif job.requested_by_id != user.pk:
                continue
            out.append(
                Item(
                    audit.pk,
                    audit.at,
                    kind,
                    _text(kind, job, audit),
                    f"/migrations/{job.pk}/",
                    audit.pk > seen,
                )
            )
        if len(out) >= limit:
            break
    return out


def unread_count(found):
    return sum(1 for item in found if item.unread)

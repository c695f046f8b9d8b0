"""Which notification events an audit event stands for.

The dispatcher reads the audit history (every state change writes one event, in the same
transaction as the change), so notifications need no hook in the migration path: a job's
end is its ``migration.finish`` event, an approval its ``migration.approve``/``reject``,
a host going away or coming back its ``host.status`` event.
"""

from dataclasses import dataclass, field


@dataclass
class Event:
    kind: str
    key: str  # unique per source event and kind: the delivery's idempotency key
    summary: str
    payload: dict = field(default_factory=dict)
    job: object = None  # the MigrationJob it is about (scope of personal subscriptions)
    host: object = None  # the Host it is about
    audit_only: bool = False  # only for those who may read the audit history


def _job_dict(job, details):
    data = {
        "id": job.pk if job else details.get("job"),
        "vm": details.get("vm") or (job.vm_name if job else ""),
        "source": details.get("source") or (job.source_name if job else ""),
        "target": details.get("target") or (job.target_name if job else ""),
        "mode": details.get("mode") or (job.mode if job else ""),
        "status": job.status if job else details.get("status", ""),
    }
    if job is not None:
        data.update(
            requested_by=job.requested_by_name,
            downtime_ms=job.downtime_ms,
            elapsed_ms=job.elapsed_ms,
            max_downtime_ms=job.max_downtime,
            bytes=job.data_processed,
            error=job.error,
            url=f"/migrations/{job.pk}/",
            api_url=f"/api/v1/jobs/{job.pk}/",
        )
    return data


def from_audit(audit):
    """The notification events of one AuditEvent (usually none)."""
    from hosts.models import Host
    from kvmweb.audit.models import AuditEvent
    from migrations_app.models import MigrationJob

    action, details = audit.action, audit.details if isinstance(audit.details, dict) else {}
    base = {"at": audit.at.isoformat(), "audit_event": audit.pk, "actor": audit.actor_name}
    if action.startswith("migration.") and audit.target_type == "migrations_app.migrationjob":
        job = (
            MigrationJob.objects.filter(pk=int(audit.target_id)).first()
            if audit.target_id.isdigit()
            else None
        )
        info = _job_dict(job, details)
        name = f"job #{info['id']} {info['vm']} {info['source']} -> {info['target']}"
        if action == "migration.finish":
            status = details.get("status")
            if status in ("succeeded", "failed", "cancelled"):
                summary = f"Migration {status}: {name}"
                if status != "succeeded" and details.get("error"):
                    summary += f" ({details['error'][:200]})"
                yield Event(
                    f"job.{status}", f"audit:{audit.pk}:job.{status}", summary, base | {"job": info}, job
                )
            downtime, limit = details.get("downtime_ms"), job.max_downtime if job else None
            if status == "succeeded" and downtime and limit and downtime > limit:
                yield Event(
                    "job.downtime_exceeded",
                    f"audit:{audit.pk}:job.downtime_exceeded",
                    f"Downtime {downtime} ms above the requested {limit} ms: {name}",
                    base | {"job": info},
                    job,
                )
        elif action == "migration.request" and audit.outcome == AuditEvent.SUCCESS:
            if details.get("status") == "pending_approval":
                yield Event(
                    "approval.requested",
                    f"audit:{audit.pk}:approval.requested",
                    f"Approval requested by {audit.actor_name}: {name}",
                    base | {"job": info},
                    job,
                )
        elif action in ("migration.approve", "migration.reject") and audit.outcome == AuditEvent.SUCCESS:
            decision = "approved" if action == "migration.approve" else "rejected"
            yield Event(
                "approval.decided",
                f"audit:{audit.pk}:approval.decided",
                f"Request {decision} by {audit.actor_name}: {name}",
                base | {"job": info, "decision": decision, "reason": details.get("reason", "")},
                job,
            )
    elif action == "batch.end":
        # Batches are staff business (operators run them): only those who may read the
        # audit history hear about them.
        status = details.get("status", "")
        counts = details.get("counts") or {}
        yield Event(
            "batch.finished",
            f"audit:{audit.pk}:batch.finished",
            f"Batch {audit.target_name} finished: {status} {counts}".strip(),
            base
            | {
                "batch": {
                    "id": audit.target_id,
                    "name": audit.target_name,
                    "status": status,
                    "counts": counts,
                }
            },
            audit_only=True,
        )
    elif action == "host.status" and audit.target_type == "hosts.host":
        host = Host.objects.filter(pk=int(audit.target_id)).first() if audit.target_id.isdigit() else None
        info = {"id": audit.target_id, "name": audit.target_name, "error": details.get("error", "")}
        if details.get("to") == "unreachable":
            summary = f"Host {audit.target_name} unreachable: {details.get('error', '')[:200]}"
            yield Event(
                "host.unreachable",
                f"audit:{audit.pk}:host.unreachable",
                summary,
                base | {"host": info},
                None,
                host,
            )
        elif details.get("to") == "reachable" and details.get("from") == "unreachable":
            yield Event(
                "host.back",
                f"audit:{audit.pk}:host.back",
                f"Host {audit.target_name} reachable again",
                base | {"host": info},
                None,
                host,
            )


def chain_broken(checked, bad, reason):
    """The event for a failed audit chain verification (one per first bad row)."""
    return Event(
        "audit.chain_broken",
        f"chain:{bad.pk}",
        f"Audit chain verification failed at event #{bad.pk}: {reason}",
        {"checked": checked, "event_id": bad.pk, "reason": reason},
        audit_only=True,
    )

"""`manage.py batch ID show|pause|resume|cancel|wait|move-back [--cancel-running] [--json]`.

``wait`` drives the batch's scheduler passes until it ends (the periodic task may run
passes too; the lease keeps them apart); ``move-back`` plans and starts the reverse batch
of an evacuation (add ``--wait`` to run it to its end)."""

import json
import sys

from django.core.management.base import BaseCommand

from fleet import scheduler
from fleet.management.commands._common import acting_user, add_user_argument, bad
from fleet.models import Batch
from fleet.services import BatchError, do_cancel_batch, do_move_back, do_pause_batch, do_resume_batch


def batch_json(batch):
    return {
        "id": batch.pk,
        "kind": batch.kind,
        "host": batch.host_name,
        "status": batch.status,
        "predicted_seconds": batch.predicted_seconds,
        "not_before": batch.not_before.isoformat() if batch.not_before else None,
        "not_after": batch.not_after.isoformat() if batch.not_after else None,
        "started_at": batch.started_at.isoformat() if batch.started_at else None,
        "finished_at": batch.finished_at.isoformat() if batch.finished_at else None,
        "counts": batch.counts(),
        "items": [
            {
                "vm": i.vm_name,
                "source": i.source_name,
                "target": i.target_name,
                "mode": i.mode,
                "status": i.status,
                "reason": i.reason,
                "job": i.job_id,
                "attempts": i.attempts,
                "previous_jobs": i.previous_jobs,
                "predicted_seconds": i.predicted_seconds,
            }
            for i in batch.items.all()
        ],
    }


def print_batch(out, batch):
    out.write(f"batch #{batch.pk} {batch.kind} {batch.host_name}: {batch.status}")
    for i in batch.items.all():
        job = f"job #{i.job_id}" if i.job_id else ""
        out.write(
            f"  {i.vm_name:24} {i.source_name:>8} -> {i.target_name or '-':8} {i.mode or '-':10} {i.status:10} {job} {i.reason[:120]}"
        )


class Command(BaseCommand):
    help = "Show or control a batch: batch ID show|pause|resume|cancel|wait|move-back"

    def add_arguments(self, parser):
        parser.add_argument("id", type=int)
        parser.add_argument("action", choices=["show", "pause", "resume", "cancel", "wait", "move-back"])
        parser.add_argument(
            "--cancel-running", action="store_true", help="cancel: abort running children too"
        )
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--timeout", type=float)
        parser.add_argument("--wait", action="store_true", help="move-back: run the new batch to its end")
        add_user_argument(parser)

    def handle(self, id, action, **o):
        actor = acting_user(self, o["user"])
        batch = Batch.objects.restrict(actor).filter(pk=id).first()
        if batch is None:
            bad(self, f"no batch #{id} visible to {actor}")
        try:
            if action in ("pause", "resume", "cancel", "move-back"):
                if not actor.has_perm("hosts.maintain_host"):
                    bad(self, f"{actor} may not control batches")
                if action == "pause":
                    do_pause_batch(batch, actor)
                elif action == "resume":
                    do_resume_batch(batch, actor)
                elif action == "cancel":
                    do_cancel_batch(batch, actor, cancel_running=o["cancel_running"])
                else:
                    batch = do_move_back(batch, actor, measure_dirty_rate=False)
                    if o["wait"]:
                        batch = scheduler.drive(batch.pk, timeout=o["timeout"])
            elif action == "wait":
                batch = scheduler.drive(batch.pk, timeout=o["timeout"])
        except BatchError as exc:
            self.stderr.write(str(exc))
            sys.exit(1)
        batch.refresh_from_db()
        if o["json"]:
            self.stdout.write(json.dumps(batch_json(batch)))
        else:
            print_batch(self.stdout, batch)

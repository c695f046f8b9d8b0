"""`manage.py evacuate HOST [--dry-run] [--json] [--wait] [--max-parallel N] [--at ISO-TIME] [--until ISO-TIME]`.

Plans the evacuation of HOST (every VM: target, mode, full preflight, predicted duration
and downtime, or why it stays) and, unless --dry-run, starts the batch. --wait drives the
batch's scheduler passes until it ends (the periodic task may run passes too; the
batch's lease keeps them apart). Exit status: 0 when every VM is placed (dry run) or
moved, 1 when some are blocked or failed, 2 for bad arguments.
"""

import json
import sys
from datetime import datetime

from django.core.management.base import BaseCommand
from django.utils import timezone

from fleet import scheduler
from fleet.management.commands._common import acting_user, add_user_argument, bad
from fleet.management.commands.batch import batch_json, print_batch
from fleet.models import Batch, BatchItem
from fleet.services import BatchError, do_create_batch, plan_evacuation
from hosts.models import Host


def print_plan(out, plan):
    out.write(f"{'VM':24} {'target':12} {'mode':10} {'predicted':>10} {'downtime':>9}  notes")
    for row in plan.rows:
        seconds = f"{row.predicted_seconds:.1f} s" if row.predicted_seconds is not None else "-"
        downtime = f"{row.predicted_downtime_ms:.0f} ms" if row.predicted_downtime_ms is not None else "-"
        if row.placed:
            out.write(
                f"{row.vm.name:24} {row.target.name:12} {row.mode:10} {seconds:>10} {downtime:>9}  "
                + "; ".join(row.warnings)[:200]
            )
        else:
            out.write(
                f"{row.vm.name:24} {'-':12} {'-':10} {'-':>10} {'-':>9}  stays here because: "
                + "; ".join(row.reasons)
            )
            for remedy in row.remedies:
                out.write(f"{'':70}  -> {remedy}")
    out.write(
        f"{len(plan.placed)} to move, {len(plan.blocked)} stay; predicted total {plan.total_seconds:.1f} s "
        f"at {plan.limits['max_parallel']} in parallel ({plan.limits['per_source']} per source, {plan.limits['per_target']} per target)"
    )


class Command(BaseCommand):
    help = "Plan (and run) the evacuation of a host."

    def add_arguments(self, parser):
        parser.add_argument("host")
        parser.add_argument("--dry-run", action="store_true", help="plan only, change nothing")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--wait", action="store_true", help="run the batch until it ends")
        parser.add_argument("--max-parallel", type=int, default=4)
        parser.add_argument("--per-source", type=int, default=2)
        parser.add_argument("--per-target", type=int, default=2)
        parser.add_argument(
            "--allow-cold", action="store_true", help="allow downtime (cold) where live is blocked"
        )
        parser.add_argument("--stop-on-failure", action="store_true")
        parser.add_argument(
            "--ignore-blackouts", action="store_true", help="administrators: start children during blackouts"
        )
        parser.add_argument("--bandwidth", type=int, help="cap every live migration at this many MiB/s")
        parser.add_argument("--quick", action="store_true", help="do not measure dirty rates")
        parser.add_argument("--at", help="start no child before this ISO time")
        parser.add_argument("--until", help="children not started by this ISO time end as 'missed window'")
        parser.add_argument("--timeout", type=float, help="--wait: give up after this many seconds")
        add_user_argument(parser)

    def handle(self, host, **o):
        window = {}
        for key, field in (("at", "not_before"), ("until", "not_after")):
            if o[key]:
                try:
                    when = datetime.fromisoformat(o[key])
                except ValueError:
                    bad(self, f"--{key}: not an ISO time: {o[key]!r}")
                window[field] = when if timezone.is_aware(when) else timezone.make_aware(when)
        for key in ("max_parallel", "per_source", "per_target"):
            if o[key] < 1:
                bad(self, f"--{key.replace('_', '-')} must be at least 1")
        actor = acting_user(self, o["user"])
        obj = Host.objects.restrict(actor).filter(name=host).first()
        if obj is None:
            bad(self, f"no host named {host!r} visible to {actor}")
        limits = {
            "max_parallel": o["max_parallel"],
            "per_source": o["per_source"],
            "per_target": o["per_target"],
        }
        try:
            plan = plan_evacuation(
                obj,
                actor,
                limits=limits,
                allow_cold=o["allow_cold"],
                measure_dirty_rate=not o["quick"],
                options={"bandwidth": o["bandwidth"]} if o["bandwidth"] else None,
            )
        except BatchError as exc:
            bad(self, str(exc))
        if o["dry_run"]:
            if o["json"]:
                self.stdout.write(json.dumps(plan.to_dict()))
            else:
                print_plan(self.stdout, plan)
            if plan.blocked:
                sys.exit(1)
            return
        try:
            batch = do_create_batch(
                plan,
                actor,
                host=obj,
                stop_on_failure=o["stop_on_failure"],
                ignore_blackouts=o["ignore_blackouts"],
                **window,
            )
        except BatchError as exc:
            bad(self, str(exc))
        if not o["json"]:
            print_plan(self.stdout, plan)
            self.stdout.write(f"batch #{batch.pk} started")
        if o["wait"]:
            batch = scheduler.drive(batch.pk, timeout=o["timeout"])
        if o["json"]:
            self.stdout.write(json.dumps(batch_json(batch)))
        else:
            print_batch(self.stdout, batch)
        bad_items = batch.items.exclude(
            status__in=[BatchItem.SUCCEEDED, BatchItem.PENDING, BatchItem.STARTED]
        ).exists()
        if bad_items or batch.status in (Batch.FAILED, Batch.CANCELLED):
            sys.exit(1)

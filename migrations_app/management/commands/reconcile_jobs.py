"""`manage.py reconcile_jobs [--loop SECONDS] [--job ID ...]`: conclude jobs whose worker
stopped.

One pass by default; --loop repeats every few seconds for that long (what the scheduled
task does on the default cluster). --job limits the pass to those jobs: with --stale 0 it
concludes a job whose worker is known dead without touching other running jobs."""

import json
import time

from django.core.management.base import BaseCommand

from migrations_app.reconcile import STALE_SECONDS, reconcile_jobs


class Command(BaseCommand):
    help = "Reconcile migration jobs whose worker's heartbeat stopped (never restarts one)."

    def add_arguments(self, parser):
        parser.add_argument("--loop", type=float, default=0, help="keep reconciling for this many seconds")
        parser.add_argument("--every", type=float, default=2.0)
        parser.add_argument("--stale", type=float, default=STALE_SECONDS, help="heartbeat age (s)")
        parser.add_argument(
            "--job", type=int, action="append", dest="jobs", help="only this job (repeatable)"
        )

    def handle(self, *args, loop=0, every=2.0, stale=STALE_SECONDS, jobs=None, **options):
        deadline = time.monotonic() + loop
        while True:
            results = reconcile_jobs(stale_seconds=stale, job_ids=jobs)
            if results:
                self.stdout.write(json.dumps({str(k): v for k, v in results.items()}))
            if time.monotonic() + every > deadline:
                return
            time.sleep(every)

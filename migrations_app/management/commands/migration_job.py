"""`manage.py migration_job JOB {show,cancel,bandwidth,downtime,postcopy} [VALUE] [--user U]`:
the job page's controls from the command line (same service functions, audited)."""

import json

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from migrations_app import services
from migrations_app.management.commands.migrate_vm import job_json
from migrations_app.models import MigrationJob


class Command(BaseCommand):
    help = "Show or control a migration job."

    def add_arguments(self, parser):
        parser.add_argument("job", type=int)
        parser.add_argument("action", choices=["show", "cancel", "bandwidth", "downtime", "postcopy"])
        parser.add_argument("value", nargs="?", type=int)
        parser.add_argument("--user", default="admin")

    def handle(self, *args, job, action, value=None, user="admin", **options):
        actor = get_user_model().objects.filter(username=user).first()
        if actor is None:
            raise CommandError(f"no kvmweb user {user!r}")
        obj = MigrationJob.objects.restrict(actor).filter(pk=job).first()
        if obj is None:
            raise CommandError(f"no job #{job} visible to {user}")
        perms = {
            "cancel": "migrations_app.cancel_migrationjob",
            "bandwidth": "migrations_app.control_migrationjob",
            "downtime": "migrations_app.control_migrationjob",
            "postcopy": "migrations_app.control_migrationjob",
        }
        if action in perms and not actor.has_perm(perms[action]):
            raise CommandError(f"{user} may not {action} migrations")
        if action in ("bandwidth", "downtime") and value is None:
            raise CommandError(f"{action} needs a value")
        try:
            if action == "cancel":
                obj = services.do_cancel_job(obj, actor)
            elif action == "bandwidth":
                obj = services.do_set_bandwidth(obj, value, actor)
            elif action == "downtime":
                obj = services.do_set_downtime(obj, value, actor)
            elif action == "postcopy":
                obj = services.do_switch_postcopy(obj, actor)
        except services.JobError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(json.dumps(job_json(obj)))

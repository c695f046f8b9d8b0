"""`manage.py cli_server`: serve `manage.py migrate_vm` and `manage.py preflight` without
Django's start-up in each of them (migrations_app/cliserver.py, started by scripts/run.sh).
Stops on SIGTERM or Ctrl-C; commands it started run on."""

from django.core.management.base import BaseCommand

from migrations_app import cliserver


class Command(BaseCommand):
    help = (
        "Run migrate_vm/preflight for manage.py without a Django start-up each (Unix socket in the data dir)."
    )
    requires_system_checks = []

    def handle(self, *args, **options):
        cliserver.serve()

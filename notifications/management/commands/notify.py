"""`manage.py notify [--loop SECONDS]`: run the notification dispatcher once (or keep
running it), the same as the scheduled task on the default cluster."""

import time

from django.core.management.base import BaseCommand

from notifications import dispatch


class Command(BaseCommand):
    help = "Collect notification events from the audit history and send due deliveries."

    def add_arguments(self, parser):
        parser.add_argument(
            "--loop", type=float, default=None, metavar="SECONDS", help="repeat every SECONDS"
        )

    def handle(self, *args, **opts):
        while True:
            result = dispatch.dispatch()
            self.stdout.write(
                f"created {result['created']}, sent {result['sent']}, failed {result['failed']}"
            )
            if opts["loop"] is None:
                return
            time.sleep(opts["loop"])

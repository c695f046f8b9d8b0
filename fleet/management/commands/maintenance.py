"""`manage.py maintenance HOST on|off [--reason TEXT]`: switch a host's maintenance mode
(audited; a host in maintenance is never a migration target)."""

from django.core.management.base import BaseCommand

from fleet.management.commands._common import acting_user, add_user_argument, bad
from hosts.models import Host
from hosts.services import do_set_maintenance


class Command(BaseCommand):
    help = "Put a host in maintenance or take it out: maintenance HOST on|off [--reason TEXT]"

    def add_arguments(self, parser):
        parser.add_argument("host")
        parser.add_argument("state", choices=["on", "off"])
        parser.add_argument("--reason", default="")
        add_user_argument(parser)

    def handle(self, host, state, reason="", user=None, **options):
        actor = acting_user(self, user)
        obj = Host.objects.restrict(actor).filter(name=host).first()
        if obj is None:
            bad(self, f"no host named {host!r} visible to {actor}")
        if not actor.has_perm("hosts.maintain_host"):
            bad(self, f"{actor} may not put hosts in maintenance")
        obj = do_set_maintenance(obj, state == "on", reason=reason, actor=actor)
        if obj.maintenance:
            self.stdout.write(
                f"{obj.name}: in maintenance since {obj.maintenance_since:%Y-%m-%d %H:%M} ({obj.maintenance_reason or 'no reason given'})"
            )
        else:
            self.stdout.write(f"{obj.name}: not in maintenance")

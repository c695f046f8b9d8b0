"""`manage.py blackout GROUP START END [--reason TEXT]`: no batch child starts from or to
a host of GROUP between START and END (ISO times). Administrators only; audited."""

from datetime import datetime

from django.core.management.base import BaseCommand
from django.utils import timezone

from fleet.management.commands._common import acting_user, add_user_argument, bad
from fleet.services import BatchError, do_create_blackout
from hosts.models import HostGroup


def _when(command, text):
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        bad(command, f"not an ISO time: {text!r}")
    return when if timezone.is_aware(when) else timezone.make_aware(when)


class Command(BaseCommand):
    help = "Add a blackout window to a host group: blackout GROUP START END [--reason TEXT]"

    def add_arguments(self, parser):
        parser.add_argument("group")
        parser.add_argument("start")
        parser.add_argument("end")
        parser.add_argument("--reason", default="")
        add_user_argument(parser)

    def handle(self, group, start, end, reason="", user=None, **options):
        actor = acting_user(self, user)
        obj = HostGroup.objects.restrict(actor).filter(name=group).first()
        if obj is None:
            bad(self, f"no host group {group!r} visible to {actor}")
        try:
            blackout = do_create_blackout(obj, _when(self, start), _when(self, end), actor, reason=reason)
        except BatchError as exc:
            bad(self, str(exc))
        self.stdout.write(f"blackout #{blackout.pk}: {blackout}")

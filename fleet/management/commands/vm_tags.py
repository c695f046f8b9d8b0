"""`manage.py vm_tags VM [--add TAG]... [--remove TAG]...`: a VM's anti-affinity tags
(VMs sharing a tag are never placed on one host by the evacuation planner)."""

from django.core.management.base import BaseCommand

from fleet.management.commands._common import acting_user, add_user_argument, bad
from fleet.services import BatchError, do_set_vm_tags
from hosts.models import VM


class Command(BaseCommand):
    help = "Show or change a VM's anti-affinity tags."

    def add_arguments(self, parser):
        parser.add_argument("vm", help="VM name or UUID")
        parser.add_argument("--add", action="append", default=[])
        parser.add_argument("--remove", action="append", default=[])
        add_user_argument(parser)

    def handle(self, vm, add, remove, user=None, **options):
        actor = acting_user(self, user)
        scope = VM.objects.restrict(actor).filter(gone=False)
        obj = scope.filter(name=vm).first()
        if obj is None and len(vm) == 36:
            obj = scope.filter(uuid=vm).first()
        if obj is None:
            bad(self, f"no VM {vm!r} visible to {actor}")
        if add or remove:
            try:
                tags = do_set_vm_tags(obj, actor, add=add, remove=remove)
            except BatchError as exc:
                bad(self, str(exc))
        else:
            tags = sorted(obj.fleet_tags.values_list("name", flat=True))
        self.stdout.write(f"{obj.name}: {', '.join(tags) or '(no tags)'}")

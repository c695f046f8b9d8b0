from django.core.management.base import BaseCommand, CommandError

from hosts import services
from hosts.models import HostGroup


class Command(BaseCommand):
    help = "Register a libvirt host: add_host NAME URI [--group G] [--no-sync]"

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("uri")
        parser.add_argument("--group", help="host group name (created if missing)")
        parser.add_argument("--no-sync", action="store_true", help="probe only, do not sync VMs")

    def handle(self, name, uri, group=None, no_sync=False, **options):
        group_obj = HostGroup.objects.get_or_create(name=group)[0] if group else None
        try:
            host = services.do_register_host(name, uri, group=group_obj, sync=not no_sync)
        except services.HostError as exc:
            raise CommandError(str(exc)) from None
        if host.is_reachable:
            vms = host.vms.filter(gone=False).count()
            self.stdout.write(f"registered {host.name} ({host.uri}): reachable, {vms} VMs")
        else:
            self.stdout.write(f"registered {host.name} ({host.uri}): UNREACHABLE: {host.last_error}")

from django.core.management.base import BaseCommand, CommandError

from hosts import services
from hosts.models import Host


class Command(BaseCommand):
    help = "Probe hosts and sync their VMs: sync_inventory [HOST ...] (default: all hosts)"

    def add_arguments(self, parser):
        parser.add_argument("hosts", nargs="*")

    def handle(self, hosts, **options):
        qs = Host.objects.all()
        if hosts:
            qs = qs.filter(name__in=hosts)
            missing = set(hosts) - set(qs.values_list("name", flat=True))
            if missing:
                raise CommandError(f"unknown host(s): {', '.join(sorted(missing))}")
        failed = 0
        for host in qs:
            s = services.do_sync_inventory(host)
            if s["error"]:
                failed += 1
                self.stdout.write(f"{host.name}: UNREACHABLE: {s['error']}")
            else:
                self.stdout.write(
                    f"{host.name}: {len(s['added'])} new, {len(s['moved'])} moved here, "
                    f"{len(s['gone'])} gone, {s['updated']} updated"
                )
        if failed:
            raise CommandError(f"{failed} host(s) unreachable")

"""`manage.py lab_demo [--hosts N]`: the KVM lab, ready to click through (used by `make demo`).

Starts (or reuses) lab hosts lab-a, lab-b (and lab-c, lab-d when asked), creates three
guests on lab-a — demo-web (running, shared storage), demo-db (running, lab-a's local
storage) and demo-batch (shut off, shared storage) — then registers every lab host in
kvmweb and syncs its inventory.  Idempotent: guests and hosts that already exist are
reused (a demo guest that was migrated elsewhere stays where it is, and is restarted if
the lab was stopped since).
"""

from django.core.management.base import BaseCommand, CommandError

from hosts import services
from hosts.models import Host

DEMO_GUESTS = [
    # name, storage, running
    ("demo-web", "shared", True),
    ("demo-db", "local", True),
    ("demo-batch", "shared", False),
]


class Command(BaseCommand):
    help = "Start the KVM lab and register its hosts with three demo guests on lab-a."

    def add_arguments(self, parser):
        parser.add_argument("--hosts", type=int, default=2, choices=[2, 3, 4], help="lab hosts (default 2)")

    def handle(self, *args, hosts=2, **options):
        try:
            import lab
        except ImportError as exc:  # libvirt-python missing
            raise CommandError(f"the lab needs libvirt-python: {exc} (run `make setup`)") from None
        names = lab.HOST_NAMES[:hosts]
        try:
            started = lab.up(hosts)
            lab.keep_running()  # a person's demo: test sessions must not tear it down
            reused = [n for n in names if n not in started]
            self.stdout.write(
                f"lab: {', '.join(names)} up ({len(started)} started, {len(reused)} reused); "
                "stop it with `make lab-down`"
            )
            for name, storage, running in DEMO_GUESTS:
                self._ensure_guest(lab, name, storage, running)
        except lab.LabError as exc:
            raise CommandError(str(exc)) from None
        for name in names:
            self._register(name, lab.uri(name))

    def _ensure_guest(self, lab, name, storage, running):
        found = lab.where(name)
        if not found:
            lab.create_guest(name, host="lab-a", storage=storage, running=running)
            self.stdout.write(
                f"guest {name}: created on lab-a ({storage} storage, {'running' if running else 'shut off'})"
            )
            return
        host, state = next(iter(found.items()))
        if running and state != "running":
            # `labctl down` destroys guests; the demo promises these two running.
            lab.start_guest(name, host)
            state = "started again"
        self.stdout.write(f"guest {name}: reused on {host} ({state})")

    def _register(self, name, uri):
        host = Host.objects.filter(uri=uri).first() or Host.objects.filter(name=name).first()
        if host is None:
            try:
                host = services.do_register_host(name, uri, description="kvmweb lab host (make demo)")
            except services.HostError as exc:
                raise CommandError(f"registering {name}: {exc}") from None
            verb = "registered"
        else:
            services.do_sync_inventory(host)
            host.refresh_from_db()
            verb = "already registered, synced"
        vms = host.vms.filter(gone=False).count()
        status = host.status if host.is_reachable else f"{host.status}: {host.last_error}"
        self.stdout.write(f"host {host.name}: {verb} ({uri}, {status}, {vms} VMs)")

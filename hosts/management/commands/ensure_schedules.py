from django.conf import settings
from django.core.management.base import BaseCommand
from django_q.models import Schedule


class Command(BaseCommand):
    help = "Create or update kvmweb's periodic tasks (idempotent)."

    def handle(self, **options):
        schedule, created = Schedule.objects.update_or_create(
            name="inventory-sync",
            defaults={
                "func": "hosts.tasks.sync_all_hosts",
                "schedule_type": Schedule.MINUTES,
                "minutes": settings.INVENTORY_SYNC_MINUTES,
                "repeats": -1,
            },
        )
        verb = "created" if created else "updated"
        self.stdout.write(f"{verb} schedule inventory-sync every {schedule.minutes} min")
        from kvmweb.health import ensure_heartbeat_schedules  # worker liveness for /health/

        self.stdout.write(f"ensured schedules {', '.join(ensure_heartbeat_schedules())} every 1 min")

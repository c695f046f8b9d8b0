"""The dispatcher's schedule on the default cluster, and its audit cursor starting at the
newest event (a new installation is not notified of its whole history)."""

from django.db import migrations

NAME = "notifications-dispatch"


def create(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name=NAME,
        defaults={
            "func": "notifications.tasks.dispatch_watch",
            "schedule_type": "I",  # minutes
            "minutes": 1,
            "repeats": -1,
        },
    )
    AuditEvent = apps.get_model("audit", "AuditEvent")
    last = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    apps.get_model("notifications", "Cursor").objects.get_or_create(name="audit", defaults={"position": last})


def remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0001_initial"),
        ("audit", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create, remove)]

"""The one row every migration job's claim updates first (fleet/limits.py: it serializes
the claims, so the batch limits counted in the claim's UPDATE hold on PostgreSQL)."""

from django.db import migrations, models


def create_row(apps, schema_editor):
    apps.get_model("fleet", "ClaimLock").objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0002_batch_schedule"),
    ]

    operations = [
        migrations.CreateModel(
            name="ClaimLock",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("claims", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.RunPython(create_row, migrations.RunPython.noop),
    ]

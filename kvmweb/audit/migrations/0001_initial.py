import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def install_guards(apps, schema_editor):
    from kvmweb.audit import guards

    guards.install(schema_editor.connection)


def remove_guards(apps, schema_editor):
    from kvmweb.audit import guards

    guards.remove(schema_editor.connection)


class Migration(migrations.Migration):
    initial = True
    dependencies = [migrations.swappable_dependency(settings.AUTH_USER_MODEL)]

    operations = [
        migrations.CreateModel(
            name="AuditEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("at", models.DateTimeField(db_index=True)),
                ("actor_name", models.CharField(blank=True, max_length=150)),
                ("action", models.CharField(db_index=True, max_length=64)),
                ("target_type", models.CharField(blank=True, max_length=64)),
                ("target_id", models.CharField(blank=True, db_index=True, max_length=64)),
                ("target_name", models.CharField(blank=True, max_length=255)),
                ("ip", models.GenericIPAddressField(blank=True, null=True)),
                ("outcome", models.CharField(choices=[("success", "success"), ("failure", "failure"), ("denied", "denied")], default="success", max_length=16)),
                ("details", models.JSONField(blank=True, default=dict)),
                ("prev_hash", models.CharField(max_length=64)),
                ("hash", models.CharField(max_length=64, unique=True)),
                ("actor", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to=settings.AUTH_USER_MODEL)),
            ],
            options={"ordering": ["-id"]},
        ),
        migrations.RunPython(install_guards, remove_guards),
    ]

from django.apps import AppConfig


class FleetConfig(AppConfig):
    """Host maintenance and batches of migrations (evacuate, move back, bulk)."""

    name = "fleet"
    verbose_name = "Fleet"

    def ready(self):
        # Host-group blackouts hold single jobs too: the runner's claim requires the
        # gate's condition (migrations_app/windows.py); migrations_app never imports fleet.
        # The batches' limits too, at the same claim (fleet/limits.py).
        from fleet.limits import limits_gate
        from fleet.models import blackout_gate
        from migrations_app.windows import register_gate

        register_gate(blackout_gate())
        register_gate(limits_gate())

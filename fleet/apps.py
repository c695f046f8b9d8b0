from django.apps import AppConfig


class FleetConfig(AppConfig):
    """Host maintenance and batches of migrations (evacuate, move back, bulk)."""

    name = "fleet"
    verbose_name = "Fleet"

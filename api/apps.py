from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    verbose_name = "REST API"
    # The Bearer scheme's drf-spectacular extension (api/schema.py) is registered when DRF
    # first loads DEFAULT_SCHEMA_CLASS (api.schema.AutoSchema), i.e. when a schema is built:
    # importing drf-spectacular here cost every process ~0.2 s.

    def ready(self):
        from api.metrics import observe_preflight
        from migrations_app.signals import preflight_checked

        def count(sender, report, source, **kwargs):
            observe_preflight(report, source=source)

        # The dry-run page and the wizard announce their checklist runs; count them too.
        preflight_checked.connect(count, dispatch_uid="api-metrics-preflight", weak=False)

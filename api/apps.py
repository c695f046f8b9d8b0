from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    verbose_name = "REST API"

    def ready(self):
        from api import schema  # noqa: F401 - registers the Bearer scheme with drf-spectacular
        from api.metrics import observe_preflight
        from migrations_app.signals import preflight_checked

        def count(sender, report, source, **kwargs):
            observe_preflight(report, source=source)

        # The dry-run page and the wizard announce their checklist runs; count them too.
        preflight_checked.connect(count, dispatch_uid="api-metrics-preflight", weak=False)

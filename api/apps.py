from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    verbose_name = "REST API"
    # The Bearer scheme's drf-spectacular extension (api/schema.py) is registered when DRF
    # first loads DEFAULT_SCHEMA_CLASS (api.schema.AutoSchema), i.e. when a schema is built:
    # importing drf-spectacular here cost every process ~0.2 s.

app_name = "migrations"
urlpatterns = []

# Preflight dry run / checklist re-run (owned by the preflight engineer).
from django.urls import path as _path  # noqa: E402

from migrations_app.preflight_views import preflight_check  # noqa: E402

urlpatterns += [_path("preflight/", preflight_check, name="preflight_check")]

from django.urls import include, path

from api import metrics
from kvmweb import health, views
from kvmweb.accounts import views as account_views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("login/", account_views.login, name="login"),
    path("logout/", account_views.logout, name="logout"),
    path("i18n/", include("django.conf.urls.i18n")),
    path("", include("hosts.urls")),
    path("migrations/", include("migrations_app.urls")),
    path("fleet/", include("fleet.urls")),
    path("accounts/", include("kvmweb.accounts.urls")),
    path("audit/", include("kvmweb.audit.urls")),
    path("health/", health.health, name="health"),
    path("api/v1/", include("api.urls")),
    path("account/tokens/", include("api.page_urls")),
    path("notifications/", include("notifications.urls")),
    path("metrics", metrics.metrics, name="metrics"),
    # Browsers ask for /favicon.ico whatever the page links; send them to the static icon.
    path("favicon.ico", views.favicon, name="favicon"),
]

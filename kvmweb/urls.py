from django.contrib import admin
from django.urls import include, path

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
    path("admin/", admin.site.urls),
    path("health/", health.health, name="health"),
]

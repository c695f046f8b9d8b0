from django.urls import path

from migrations_app import approvals, policy_views, views
from migrations_app.preflight_views import preflight_check

app_name = "migrations"
urlpatterns = [
    path("", views.job_list, name="list"),
    path("new/", views.wizard, name="new"),
    path("<int:pk>/", views.job_detail, name="detail"),
    path("<int:pk>/cancel/", views.job_cancel, name="cancel"),
    path("<int:pk>/bandwidth/", views.job_bandwidth, name="bandwidth"),
    path("<int:pk>/downtime/", views.job_downtime, name="downtime"),
    path("<int:pk>/postcopy/", views.job_postcopy, name="postcopy"),
    path("<int:pk>/force-off/", views.job_force_off, name="force_off"),
    path("left-copies/<int:pk>/delete/", views.left_copy_delete, name="left_copy_delete"),
    path("preflight/", preflight_check, name="preflight_check"),  # the dry run
    path("approvals/", approvals.queue, name="approvals"),
    path("approvals/<int:pk>/approve/", approvals.approve, name="approve"),
    path("approvals/<int:pk>/reject/", approvals.reject, name="reject"),
    path("policies/add/", policy_views.policy_edit, name="policy_add"),
    path("policies/<int:pk>/", policy_views.policy_edit, name="policy_edit"),
    path("policies/<int:pk>/delete/", policy_views.policy_delete, name="policy_delete"),
]

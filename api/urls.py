"""/api/v1/ routes (docs/api.md)."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

from api import views

app_name = "api"
# The schema and its viewers are public: they describe the API, they show no data.
public = {"permission_classes": [AllowAny], "authentication_classes": []}
urlpatterns = [
    path("", views.IndexView.as_view(), name="index"),
    path("schema/", SpectacularAPIView.as_view(**public), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema", **public), name="docs"),
    path("hosts/", views.HostListView.as_view(), name="host_list"),
    path("hosts/<int:pk>/", views.HostDetailView.as_view(), name="host_detail"),
    path("hosts/<int:pk>/sync/", views.HostSyncView.as_view(), name="host_sync"),
    path("hosts/<int:pk>/maintenance/", views.HostMaintenanceView.as_view(), name="host_maintenance"),
    path("hosts/<int:pk>/evacuate/", views.HostEvacuateView.as_view(), name="host_evacuate"),
    path("vms/", views.VMListView.as_view(), name="vm_list"),
    path("vms/<int:pk>/", views.VMDetailView.as_view(), name="vm_detail"),
    path("vms/<int:pk>/power/", views.VMPowerView.as_view(), name="vm_power"),
    path("preflight/", views.PreflightView.as_view(), name="preflight"),
    path("jobs/", views.JobListView.as_view(), name="job_list"),
    path("jobs/<int:pk>/", views.JobDetailView.as_view(), name="job_detail"),
    path("jobs/<int:pk>/events/", views.JobEventsView.as_view(), name="job_events"),
    path("jobs/<int:pk>/cancel/", views.JobCancelView.as_view(), name="job_cancel"),
    path("jobs/<int:pk>/bandwidth/", views.JobBandwidthView.as_view(), name="job_bandwidth"),
    path("jobs/<int:pk>/downtime/", views.JobDowntimeView.as_view(), name="job_downtime"),
    path("jobs/<int:pk>/postcopy/", views.JobPostcopyView.as_view(), name="job_postcopy"),
    path("approvals/", views.ApprovalListView.as_view(), name="approval_list"),
    path("approvals/<int:pk>/approve/", views.ApproveView.as_view(), name="approve"),
    path("approvals/<int:pk>/reject/", views.RejectView.as_view(), name="reject"),
    path("batches/", views.BatchListView.as_view(), name="batch_list"),
    path("batches/<int:pk>/", views.BatchDetailView.as_view(), name="batch_detail"),
    path("batches/<int:pk>/pause/", views.BatchPauseView.as_view(), name="batch_pause"),
    path("batches/<int:pk>/resume/", views.BatchResumeView.as_view(), name="batch_resume"),
    path("batches/<int:pk>/cancel/", views.BatchCancelView.as_view(), name="batch_cancel"),
    path("audit/", views.AuditListView.as_view(), name="audit_list"),
    path("audit/<int:pk>/", views.AuditDetailView.as_view(), name="audit_detail"),
]

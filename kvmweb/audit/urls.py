from django.urls import path

from kvmweb.audit import views

app_name = "audit"
urlpatterns = [
    path("", views.event_list, name="list"),
    path("<int:pk>/", views.event_detail, name="detail"),
    path("export.csv", views.event_export, {"fmt": "csv"}, name="export_csv"),
    path("export.json", views.event_export, {"fmt": "json"}, name="export_json"),
]

from django.urls import path

from fleet import views

app_name = "fleet"
urlpatterns = [
    path("batches/", views.batch_list, name="list"),
    path("batches/<int:pk>/", views.batch_detail, name="batch"),
    path("batches/<int:pk>/live/", views.batch_rows, name="batch_live"),
    path("batches/<int:pk>/pause/", views.batch_pause, name="pause"),
    path("batches/<int:pk>/resume/", views.batch_resume, name="resume"),
    path("batches/<int:pk>/cancel/", views.batch_cancel, name="cancel"),
    path("batches/<int:pk>/move-back/", views.batch_move_back, name="move_back"),
    path("hosts/<int:pk>/evacuate/", views.evacuate, name="evacuate"),
    path("hosts/<int:pk>/maintenance/", views.host_maintenance, name="maintenance"),
    path("bulk/", views.bulk, name="bulk"),
]

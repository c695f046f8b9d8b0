from django.urls import path

from notifications import views

app_name = "notifications"
urlpatterns = [
    path("", views.subscription_list, name="list"),
    path("<int:pk>/", views.subscription_detail, name="detail"),
    path("<int:pk>/delete/", views.subscription_delete, name="delete"),
    path("bell/", views.bell, name="bell"),
    path("bell/read/", views.mark_read, name="mark_read"),
]

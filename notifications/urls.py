from django.urls import path

from notifications import views

app_name = "notifications"
urlpatterns = [
    path("", views.subscription_list, name="list"),
    path("<int:pk>/", views.subscription_detail, name="detail"),
    path("<int:pk>/delete/", views.subscription_delete, name="delete"),
]

from django.urls import path

from kvmweb.accounts import views

app_name = "accounts"
urlpatterns = [
    path("users/", views.user_list, name="users"),
    path("users/add/", views.user_add, name="user_add"),
    path("users/<int:pk>/roles/", views.user_roles, name="user_roles"),
    path("users/<int:pk>/unlock/", views.user_unlock, name="user_unlock"),
    path("theme/", views.set_theme, name="theme"),
]

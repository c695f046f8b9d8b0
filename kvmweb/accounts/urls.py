from django.urls import path

from kvmweb.accounts import approvals, ownership, views

app_name = "accounts"
urlpatterns = [
    path("users/", views.user_list, name="users"),
    path("users/add/", views.user_add, name="user_add"),
    path("users/<int:pk>/roles/", views.user_roles, name="user_roles"),
    path("users/<int:pk>/unlock/", views.user_unlock, name="user_unlock"),
    path("ownership/", ownership.bulk_owner, name="bulk_owner"),
    path("vms/<int:pk>/owner/", ownership.vm_owner, name="vm_owner"),
    path("host-groups/", views.host_groups, name="host_groups"),
    path("host-groups/add/", views.host_group_edit, name="host_group_add"),
    path("host-groups/<int:pk>/", views.host_group_edit, name="host_group_edit"),
    path("host-groups/<int:pk>/delete/", views.host_group_delete, name="host_group_delete"),
    path("policies/add/", views.policy_edit, name="policy_add"),
    path("policies/<int:pk>/", views.policy_edit, name="policy_edit"),
    path("policies/<int:pk>/delete/", views.policy_delete, name="policy_delete"),
    path("approvals/", approvals.queue, name="approvals"),
    path("approvals/<int:pk>/approve/", approvals.approve, name="approve"),
    path("approvals/<int:pk>/reject/", approvals.reject, name="reject"),
    path("theme/", views.set_theme, name="theme"),
]

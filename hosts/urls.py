from django.urls import path

from hosts import groups, ownership, views

app_name = "hosts"
urlpatterns = [
    path("hosts/", views.host_list, name="list"),
    path("hosts/add/", views.host_add, name="add"),
    path("hosts/ssh-key/", views.ssh_key_generate, name="ssh_key"),
    path("hosts/add/connect/", views.host_connect, name="connect"),
    path("hosts/add/certificate/", views.host_certificate_new, name="certificate_new"),
    path("hosts/host-key/", views.host_key_confirm, name="host_key_confirm"),
    path("hosts/<int:pk>/host-key/", views.host_key_replace, name="host_key_replace"),
    path("hosts/<int:pk>/", views.host_detail, name="detail"),
    path("hosts/<int:pk>/edit/", views.host_edit, name="edit"),
    path("hosts/<int:pk>/certificate/", views.host_certificate, name="certificate"),
    path("hosts/<int:pk>/remove/", views.host_remove, name="remove"),
    path("hosts/<int:pk>/sync/", views.host_sync, name="sync"),
    path("vms/", views.vm_list, name="vm_list"),
    path("vms/<int:pk>/", views.vm_detail, name="vm_detail"),
    path("vms/<int:pk>/power/", views.vm_power, name="vm_power"),
    path("vms/<int:pk>/owner/", ownership.vm_owner, name="vm_owner"),
    path("vms/ownership/", ownership.bulk_owner, name="bulk_owner"),
    path("host-groups/", groups.host_groups, name="groups"),
    path("host-groups/add/", groups.host_group_edit, name="group_add"),
    path("host-groups/<int:pk>/", groups.host_group_edit, name="group_edit"),
    path("host-groups/<int:pk>/delete/", groups.host_group_delete, name="group_delete"),
]

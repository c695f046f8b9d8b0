from django.contrib import admin

from hosts.models import VM, Host, HostGroup, VMLocation


@admin.register(HostGroup)
class HostGroupAdmin(admin.ModelAdmin):
    list_display = ["name", "description"]


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "uri", "group", "status", "last_seen_at"]
    list_filter = ["status", "group"]
    search_fields = ["name", "uri", "hostname"]
    # Registration and URI changes go through the audited services (the Hosts pages);
    # the admin only shows hosts and edits their group/description.
    readonly_fields = [f.name for f in Host._meta.fields if f.name not in ("group", "description")]

    def has_add_permission(self, request):
        return False


class VMLocationInline(admin.TabularInline):
    model = VMLocation
    extra = 0
    can_delete = False
    readonly_fields = ["host", "host_name", "at", "via", "note"]


@admin.register(VM)
class VMAdmin(admin.ModelAdmin):
    list_display = ["name", "uuid", "host", "state", "gone", "owner_user", "owner_group"]
    list_filter = ["state", "gone", "host"]
    search_fields = ["name", "uuid"]
    # Ownership changes go through the audited Ownership pages, never the admin.
    readonly_fields = [f.name for f in VM._meta.fields]
    inlines = [VMLocationInline]

    def has_add_permission(self, request):
        return False

"""Host group pages (administration): the list of groups with their self-service
policies, and adding, changing and deleting a group."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from hosts import services
from hosts.forms import HostGroupForm
from hosts.models import Host, HostGroup
from kvmweb.access import require, scoped
from kvmweb.accounts.models import SelfServicePolicy


@login_required
def host_groups(request):
    require(request.user, "hosts.view_hostgroup")
    groups = scoped(HostGroup, request.user).prefetch_related("hosts")
    policies = {
        p.source_group_id: p
        for p in scoped(SelfServicePolicy, request.user).prefetch_related("target_groups")
    }
    rows = [(group, policies.get(group.pk)) for group in groups]
    ungrouped = scoped(Host, request.user).filter(group__isnull=True)
    return render(request, "hosts/host_groups.html", {"rows": rows, "ungrouped": ungrouped})


@login_required
def host_group_edit(request, pk=None):
    group = None
    if pk is None:
        require(request.user, "hosts.add_hostgroup")
    else:
        group = get_object_or_404(scoped(HostGroup, request.user, "change"), pk=pk)
        require(request.user, "hosts.change_hostgroup")
    initial = {}
    if group is not None:
        initial = {"name": group.name, "description": group.description, "hosts": list(group.hosts.all())}
    form = HostGroupForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            services.do_save_host_group(group, actor=request.user, request=request, **form.cleaned_data)
        except services.HostGroupError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Host group saved."))
            return redirect("hosts:groups")
    return render(request, "hosts/host_group_form.html", {"form": form, "group": group})


@login_required
@require_POST
def host_group_delete(request, pk):
    group = get_object_or_404(scoped(HostGroup, request.user, "delete"), pk=pk)
    require(request.user, "hosts.delete_hostgroup")
    services.do_delete_host_group(group, actor=request.user, request=request)
    messages.success(request, _("Host group deleted; its hosts are now ungrouped."))
    return redirect("hosts:groups")

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from hosts import services
from hosts.forms import HostForm, VMFilterForm
from hosts.models import VM, Host
from kvmweb.access import get_scoped_or_404, require, scoped


@login_required
def host_list(request):
    hosts = scoped(Host, request.user).select_related("group")
    return render(request, "hosts/host_list.html", {"hosts": hosts})


@login_required
def host_detail(request, pk):
    host = get_scoped_or_404(Host, request.user, pk=pk)
    vms = scoped(VM, request.user).filter(host=host).order_by("gone", "name")
    return render(request, "hosts/host_detail.html", {"host": host, "vms": vms})


@login_required
def host_add(request):
    require(request.user, "hosts.add_host")
    form = HostForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            host = services.do_register_host(
                form.cleaned_data["name"],
                form.cleaned_data["uri"],
                group=form.cleaned_data["group"],
                description=form.cleaned_data["description"],
                actor=request.user,
                request=request,
            )
        except services.HostError as exc:
            form.add_error(None, str(exc))
        else:
            if host.is_reachable:
                messages.success(request, _("Host %(name)s registered.") % {"name": host.name})
            else:
                messages.warning(
                    request,
                    _("Host %(name)s registered but not reachable: %(error)s")
                    % {"name": host.name, "error": host.last_error},
                )
            return redirect("hosts:detail", pk=host.pk)
    return render(request, "hosts/host_form.html", {"form": form})


@login_required
def host_edit(request, pk):
    host = get_scoped_or_404(Host, request.user, "change", perm="hosts.change_host", pk=pk)
    initial = {"name": host.name, "uri": host.uri, "group": host.group, "description": host.description}
    form = HostForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            services.do_update_host(host, actor=request.user, request=request, **form.cleaned_data)
        except services.HostError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Host saved."))
            return redirect("hosts:detail", pk=host.pk)
    return render(request, "hosts/host_form.html", {"form": form, "host": host})


@login_required
@require_POST
def host_remove(request, pk):
    host = get_scoped_or_404(Host, request.user, "delete", perm="hosts.delete_host", pk=pk)
    services.do_remove_host(host, actor=request.user, request=request)
    messages.success(request, _("Host %(name)s removed; its VMs are kept as gone.") % {"name": host.name})
    return redirect("hosts:list")


@login_required
@require_POST
def host_sync(request, pk):
    host = get_scoped_or_404(Host, request.user, "sync", perm="hosts.sync_host", pk=pk)
    summary = services.do_sync_inventory(host, actor=request.user, request=request)
    if summary["error"]:
        messages.error(request, _("Sync failed: %(error)s") % {"error": summary["error"]})
    else:
        messages.success(
            request,
            _("Synced: %(added)d new, %(moved)d moved here, %(gone)d gone.")
            % {"added": len(summary["added"]), "moved": len(summary["moved"]), "gone": len(summary["gone"])},
        )
    return redirect("hosts:detail", pk=host.pk)


@login_required
def vm_list(request):
    form = VMFilterForm(request.GET or None)
    vms = scoped(VM, request.user).select_related("host", "owner_user", "owner_group")
    filters = form.cleaned_data if form.is_valid() else {}
    if not filters.get("gone"):
        vms = vms.filter(gone=False)
    if filters.get("q"):
        vms = vms.filter(name__icontains=filters["q"])
    if filters.get("host"):
        vms = vms.filter(host_id=filters["host"])
    if filters.get("state"):
        vms = vms.filter(state=filters["state"])
    page = Paginator(vms.order_by("name", "id"), 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "hosts/vm_list.html",
        {
            "page": page,
            "form": form,
            "hosts": scoped(Host, request.user).only("id", "name"),
            "states": VM.STATES,
            "query": query.urlencode(),
        },
    )


@login_required
def vm_detail(request, pk):
    vm = get_scoped_or_404(VM, request.user, pk=pk)
    # The location trail is part of the history section (vm_history), which masks hosts
    # outside the viewer's scope.
    return render(request, "hosts/vm_detail.html", {"vm": vm})

from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_POST

from hosts import services, transport
from hosts.forms import CertificateForm, ConnectForm, HostEditForm, HostForm, VMFilterForm
from hosts.models import VM, Host, VMQuerySet
from kvmweb.access import get_scoped_or_404, require, scoped


@login_required
def host_list(request):
    hosts = scoped(Host, request.user).select_related("group")
    identity = transport.ssh_identity() if request.user.has_perm("hosts.add_host") else None
    return render(request, "hosts/host_list.html", {"hosts": hosts, "ssh_identity": identity})


@login_required
@require_POST
def ssh_key_generate(request):
    require(request.user, "hosts.add_host")
    try:
        identity = services.do_generate_ssh_key(actor=request.user, request=request)
    except services.HostError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("SSH key generated: %(fp)s") % {"fp": identity.fingerprint})
    return redirect("hosts:list")


@login_required
def host_detail(request, pk):
    host = get_scoped_or_404(Host, request.user, pk=pk)
    vms = scoped(VM, request.user).filter(host=host).select_related("host", "owner_user", "owner_group")
    vms = list(vms.order_by("gone", "name", "pk"))
    return render(
        request,
        "hosts/host_detail.html",
        {
            "host": host,
            "vms": vms,
            "busy": services.busy_vm_ids(vms),
            "certificate": transport.client_certificate(host.uri),
            "host_key": services.changed_host_key(host, request.user),
        },
    )


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
def host_connect(request):
    """The add-host wizard: transport, user, address, port -> the URI, and "Test
    connection" step by step (GET: it changes nothing).  A host key to confirm posts to
    host_key_confirm, which comes back here and so tests again; when every step passed,
    "Register this host" posts the URI to host_add (the same registration, audited)."""
    require(request.user, "hosts.add_host")
    form = ConnectForm(request.GET or None)
    steps = services.check_connection(form.cleaned_data["uri"]) if form.is_valid() else None
    return render(
        request,
        "hosts/host_connect.html",
        {
            "form": form,
            "steps": steps,
            "ready": services.connection_ready(steps),
            "uri": form.cleaned_data.get("uri", "") if form.is_bound else "",
        },
    )


@login_required
@require_POST
def host_key_confirm(request):
    """Confirm the SSH host key the wizard showed (audited), then back to the wizard."""
    require(request.user, "hosts.add_host")
    try:
        services.do_confirm_host_key(
            request.POST.get("uri", ""),
            request.POST.get("fingerprint", ""),
            actor=request.user,
            request=request,
        )
    except services.HostError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, _("Host key confirmed: %(fp)s") % {"fp": request.POST.get("fingerprint", "")}
        )
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return redirect(back)
    return redirect("hosts:connect")


@login_required
@require_POST
def host_key_replace(request, pk):
    """Replace a registered host's SSH host key after it changed (audited)."""
    host = get_scoped_or_404(Host, request.user, "change", perm="hosts.change_host", pk=pk)
    try:
        services.do_confirm_host_key(
            host.uri, request.POST.get("fingerprint", ""), actor=request.user, request=request, replace=True
        )
    except services.HostError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, _("Host key replaced; the next connection uses it."))
    return redirect("hosts:detail", pk=host.pk)


@sensitive_post_parameters("key_pem")  # never in an error report or a debug page
@login_required
def host_certificate(request, pk):
    """A qemu+tls host's own client certificate (administrators: hosts.change_host)."""
    host = get_scoped_or_404(Host, request.user, "change", perm="hosts.change_host", pk=pk)
    form = CertificateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.do_set_tls_certificate(host, actor=request.user, request=request, **form.cleaned_data)
        except services.HostError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Certificate saved; the next connection to the host uses it."))
            return redirect("hosts:detail", pk=host.pk)
    return render(
        request,
        "hosts/host_certificate.html",
        {"form": form, "host": host, "certificate": transport.client_certificate(host.uri)},
    )


@sensitive_post_parameters("key_pem")
@login_required
def host_certificate_new(request):
    """The Add host wizard's TLS certificate for a host not registered yet: the PEM texts
    are posted here (never in the wizard's GET), stored, and the wizard comes back with
    the directory as pkipath (administrators: hosts.add_host)."""
    require(request.user, "hosts.add_host")
    form = CertificateForm(request.POST or None, bundle_only=True)
    if request.method == "POST" and form.is_valid():
        try:
            directory = services.do_stage_tls_certificate(
                ca_pem=form.cleaned_data["ca_pem"],
                cert_pem=form.cleaned_data["cert_pem"],
                key_pem=form.cleaned_data["key_pem"],
                actor=request.user,
                request=request,
            )
        except services.HostError as exc:
            form.add_error(None, str(exc))
        else:
            query = urlencode(
                {"transport": "tls", "pkipath": str(directory), "address": request.GET.get("address", "")}
            )
            return redirect(f"{reverse('hosts:connect')}?{query}")
    return render(request, "hosts/host_certificate.html", {"form": form, "host": None, "certificate": None})


@login_required
def host_edit(request, pk):
    host = get_scoped_or_404(Host, request.user, "change", perm="hosts.change_host", pk=pk)
    initial = {
        "name": host.name,
        "uri": host.uri,
        "group": host.group,
        "description": host.description,
        "migration_port_min": host.migration_port_min,
        "migration_port_max": host.migration_port_max,
    }
    form = HostEditForm(request.POST or None, initial=initial)
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


SORT_COLUMNS = ["name", "state", "host", "vcpus", "memory", "owner"]


def _sort_links(request, sort):
    """For each sortable column: the URL that sorts by it (toggling the direction when it
    is the current column) and the current direction ("asc", "desc" or "")."""
    links = {}
    for key in SORT_COLUMNS:
        query = request.GET.copy()
        query.pop("page", None)
        query["sort"] = f"-{key}" if sort == key else key
        direction = "asc" if sort == key else "desc" if sort == f"-{key}" else ""
        links[key] = {"url": "?" + query.urlencode(), "dir": direction}
    return links


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
    sort = request.GET.get("sort") or "name"
    if sort.lstrip("-") not in VMQuerySet.SORTS:
        sort = "name"
    page = Paginator(vms.sorted_by(sort), 50).get_page(request.GET.get("page"))
    page.object_list = list(page.object_list)
    query = request.GET.copy()
    query.pop("page", None)
    # Filtering as you type swaps only the results (htmx); a plain GET renders the page.
    partial = request.htmx and not request.htmx.boosted and not request.htmx.history_restore_request
    response = render(
        request,
        "hosts/partials/vm_results.html" if partial else "hosts/vm_list.html",
        {
            "page": page,
            "form": form,
            "hosts": [] if partial else scoped(Host, request.user).only("id", "name"),
            "states": VM.STATES,
            "query": query.urlencode(),
            "sort": sort,
            "columns": _sort_links(request, sort),
            "busy": services.busy_vm_ids(page.object_list),
        },
    )
    patch_vary_headers(response, ["HX-Request"])
    return response


@login_required
def vm_detail(request, pk):
    vm = get_scoped_or_404(VM, request.user, pk=pk)
    # The location trail is part of the history section (vm_history), which masks hosts
    # outside the viewer's scope.
    return render(request, "hosts/vm_detail.html", {"vm": vm, "busy": services.busy_vm_ids([vm])})


POWER_DONE = {
    "start": gettext_lazy("%(vm)s started."),
    "shutdown": gettext_lazy("Asked %(vm)s to shut down; the guest decides when (refresh to see its state)."),
    "destroy": gettext_lazy("%(vm)s was forced off."),
    "reboot": gettext_lazy("Asked %(vm)s to reboot."),
}


@login_required
@require_POST
def vm_power(request, pk):
    """Start, shut down, force off or reboot one VM (POST action=...)."""
    vm = get_scoped_or_404(VM, request.user, "power", perm="hosts.power_vm", pk=pk)
    action = request.POST.get("action", "")
    try:
        services.do_vm_power(request.user, vm, action, request=request)
    except services.PowerError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, str(POWER_DONE[action]) % {"vm": vm.name})
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return redirect(back)
    return redirect("hosts:vm_detail", pk=vm.pk)

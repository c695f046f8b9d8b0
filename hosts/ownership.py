"""VM ownership pages: one VM, or many picked from a filtered list (administrators)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from hosts import services
from hosts.forms import KEEP, NOBODY, OwnerForm, OwnershipFilterForm
from hosts.models import VM
from kvmweb.access import get_scoped_or_404, require, scoped

PAGE_SIZE = 100


@login_required
def vm_owner(request, pk):
    vm = get_scoped_or_404(VM, request.user, "change", perm="hosts.change_vm", pk=pk)
    initial = {
        "owner_user": str(vm.owner_user_id) if vm.owner_user_id else NOBODY,
        "owner_group": str(vm.owner_group_id) if vm.owner_group_id else NOBODY,
    }
    form = OwnerForm(request.POST or None, initial=initial, keep=False)
    if request.method == "POST" and form.is_valid():
        owner_user, owner_group = form.owners()
        services.do_set_owner(
            [vm], owner_user=owner_user, owner_group=owner_group, actor=request.user, request=request
        )
        messages.success(request, _("Owner of %(name)s saved.") % {"name": vm.name})
        return redirect("hosts:vm_detail", pk=vm.pk)
    return render(request, "hosts/vm_owner.html", {"vm": vm, "form": form})


def _filtered_vms(user, filters):
    vms = scoped(VM, user, "change").select_related("host", "owner_user", "owner_group")
    if filters.get("q"):
        vms = vms.filter(name__icontains=filters["q"])
    if filters.get("host"):
        vms = vms.filter(host=filters["host"])
    if filters.get("group"):
        vms = vms.filter(host__group=filters["group"])
    if filters.get("owner"):
        name = filters["owner"].strip()
        vms = vms.filter(Q(owner_user__username__icontains=name) | Q(owner_group__name__icontains=name))
    if filters.get("unowned"):
        vms = vms.filter(owner_user__isnull=True, owner_group__isnull=True)
    return vms.filter(gone=False).order_by("name", "id")


@login_required
def bulk_owner(request):
    """GET: filter and pick VMs. POST: set the owner of the picked VMs (ids that are
    not in the user's change scope are ignored, never revealed)."""
    require(request.user, "hosts.change_vm")
    filters_form = OwnershipFilterForm(request.GET or None)
    filters = filters_form.cleaned_data if filters_form.is_valid() else {}
    form = OwnerForm(request.POST or None, initial={"owner_user": KEEP, "owner_group": KEEP})
    if request.method == "POST":
        ids = [int(v) for v in request.POST.getlist("vm") if v.isdigit()]
        vms = list(scoped(VM, request.user, "change").filter(pk__in=ids))
        if not vms:
            messages.error(request, _("Pick at least one VM."))
        elif form.is_valid():
            owner_user, owner_group = form.owners()
            changed = services.do_set_owner(
                vms, owner_user=owner_user, owner_group=owner_group, actor=request.user, request=request
            )
            messages.success(
                request,
                ngettext("Owner changed on %(n)d VM.", "Owner changed on %(n)d VMs.", changed)
                % {"n": changed},
            )
            return redirect(request.get_full_path())
    page = Paginator(_filtered_vms(request.user, filters), PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "hosts/bulk_owner.html",
        {"page": page, "form": form, "filters": filters_form, "query": query.urlencode()},
    )

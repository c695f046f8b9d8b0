"""Self-service policy pages (administration): add, change and remove the policy of a
source host group. The policies are listed on the host groups page (hosts/groups.py)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from kvmweb.access import get_scoped_or_404, require
from kvmweb.accounts.models import SelfServicePolicy
from migrations_app import services
from migrations_app.policy_forms import PolicyForm


@login_required
def policy_edit(request, pk=None):
    policy = None
    if pk is None:
        require(request.user, "accounts.add_selfservicepolicy")
        initial = {"source_group": request.GET.get("group"), "requires_approval": True}
    else:
        policy = get_scoped_or_404(
            SelfServicePolicy, request.user, "change", perm="accounts.change_selfservicepolicy", pk=pk
        )
        initial = {
            "source_group": policy.source_group,
            "target_groups": list(policy.target_groups.all()),
            "allowed_modes": policy.allowed_modes,
            "max_bandwidth": policy.max_bandwidth,
            "requires_approval": policy.requires_approval,
        }
    form = PolicyForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            services.do_save_policy(policy, actor=request.user, request=request, **form.cleaned_data)
        except services.PolicyError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Self-service policy saved."))
            return redirect("hosts:groups")
    return render(request, "migrations_app/policy_form.html", {"form": form, "policy": policy})


@login_required
@require_POST
def policy_delete(request, pk):
    policy = get_scoped_or_404(
        SelfServicePolicy, request.user, "delete", perm="accounts.delete_selfservicepolicy", pk=pk
    )
    services.do_delete_policy(policy, actor=request.user, request=request)
    messages.success(request, _("Self-service policy removed."))
    return redirect("hosts:groups")

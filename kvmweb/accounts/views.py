"""Sign-in, users and roles (administration), display preferences."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST

from kvmweb.access import require
from kvmweb.accounts import scope, services
from kvmweb.accounts.forms import NewUserForm, RolesForm
from kvmweb.accounts.roles import ROLES


class LoginForm(forms.Form):
    username = forms.CharField(label=gettext_lazy("Username"), max_length=150)
    password = forms.CharField(label=gettext_lazy("Password"), widget=forms.PasswordInput)


def login(request):
    form = LoginForm(request.POST or None)
    next_url = request.POST.get("next") or request.GET.get("next") or ""
    if not url_has_allowed_host_and_scheme(next_url, {request.get_host()}):
        next_url = ""
    if request.method == "POST" and form.is_valid():
        try:
            services.do_login(request, form.cleaned_data["username"], form.cleaned_data["password"])
        except services.LoginRefused as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(next_url or "dashboard")
    return render(request, "accounts/login.html", {"form": form, "next": next_url})


@require_POST
def logout(request):
    services.do_logout(request)
    return redirect("login")


# --- Users and roles ------------------------------------------------------------------


@login_required
def user_list(request):
    require(request.user, "auth.view_user")
    users = scope.users(request.user).order_by("username").prefetch_related("groups")
    rows = [(u, sorted(g.name for g in u.groups.all() if g.name in ROLES)) for u in users]
    return render(request, "accounts/user_list.html", {"rows": rows})


@login_required
def user_add(request):
    require(request.user, "auth.add_user")
    form = NewUserForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.do_create_user(actor=request.user, request=request, **form.cleaned_data)
        except services.AccountError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("User %(name)s created.") % {"name": user.get_username()})
            return redirect("accounts:users")
    return render(request, "accounts/user_form.html", {"form": form})


@login_required
def user_roles(request, pk):
    target = get_object_or_404(scope.users(request.user, "change"), pk=pk)
    require(request.user, "auth.change_user")
    initial = {"roles": services.user_roles(target), "active": target.is_active}
    form = RolesForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            services.do_set_roles(target, actor=request.user, request=request, **form.cleaned_data)
        except services.AccountError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Roles of %(name)s saved.") % {"name": target.get_username()})
            return redirect("accounts:users")
    return render(request, "accounts/user_roles.html", {"form": form, "target": target})


@login_required
@require_POST
def user_unlock(request, pk):
    target = get_object_or_404(scope.users(request.user, "change"), pk=pk)
    require(request.user, "auth.change_user")
    services.do_unlock_login(target, actor=request.user, request=request)
    messages.success(
        request, _("%(name)s may sign in again from every address.") % {"name": target.get_username()}
    )
    return redirect("accounts:user_roles", pk=target.pk)


# --- Display preferences --------------------------------------------------------------


@login_required
@require_POST
def set_theme(request):
    """Switch between the system's colour scheme, light and dark; back to the page."""
    try:
        services.do_set_theme(request, request.POST.get("theme", ""))
    except ValueError:
        messages.error(request, _("Unknown theme."))
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return redirect(back)
    return redirect("dashboard")

from django import forms
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST

from kvmweb.accounts import services


class LoginForm(forms.Form):
    username = forms.CharField(label=_("Username"), max_length=150)
    password = forms.CharField(label=_("Password"), widget=forms.PasswordInput)


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

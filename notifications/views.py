"""Notification subscriptions: your own (and, for administrators, the global ones) with
their delivery log."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST

from kvmweb.access import get_scoped_or_404, scoped
from kvmweb.accounts.roles import ADMINISTRATOR, has_role
from notifications import services
from notifications.models import EVENTS, Subscription


class SubscriptionForm(forms.Form):
    name = forms.CharField(label=gettext_lazy("Name"), max_length=100)
    kind = forms.ChoiceField(label=gettext_lazy("Channel"), choices=Subscription.KINDS)
    target = forms.CharField(label=gettext_lazy("Email address(es) or URL"), max_length=1000)
    events = forms.MultipleChoiceField(
        label=gettext_lazy("Events"), choices=EVENTS, widget=forms.CheckboxSelectMultiple
    )
    is_global = forms.BooleanField(label=gettext_lazy("For every event (global)"), required=False)


@login_required
def subscription_list(request):
    form = SubscriptionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.do_subscribe(request.user, request=request, **form.cleaned_data)
        except services.SubscriptionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Subscription saved."))
            return redirect("notifications:list")
    subscriptions = scoped(Subscription, request.user).select_related("owner")
    return render(
        request,
        "notifications/subscriptions.html",
        {"form": form, "subscriptions": subscriptions, "is_admin": has_role(request.user, ADMINISTRATOR)},
    )


@login_required
def subscription_detail(request, pk):
    sub = get_scoped_or_404(Subscription, request.user, pk=pk)
    deliveries = sub.deliveries.order_by("-id")[:100]
    return render(request, "notifications/subscription_detail.html", {"sub": sub, "deliveries": deliveries})


@login_required
@require_POST
def subscription_delete(request, pk):
    sub = get_scoped_or_404(Subscription, request.user, "delete", pk=pk)
    services.do_unsubscribe(sub, actor=request.user, request=request)
    messages.success(request, _("Subscription removed."))
    return redirect("notifications:list")


@login_required
def bell(request):
    """The header's bell (count and list); pushed by ws/notifications/ and fetched here
    when the socket is down. Scoped like the job pages (notifications/inbox.py)."""
    from notifications import live

    return render(request, "notifications/partials/bell.html", live.context(request.user))


@login_required
@require_POST
def mark_read(request):
    """Mark the bell's notifications read (up to the newest the user saw)."""
    try:
        up_to = int(request.POST.get("up_to") or 0)
    except ValueError:
        up_to = 0
    services.do_mark_read(request.user, up_to, request=request)
    if request.headers.get("HX-Request"):
        return bell(request)
    # Back where the user was: a path on this site only, and never the bell's own
    # fragment (its form is rendered by the htmx request for the bell).
    back = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure())
    if back and safe and not back.startswith(reverse("notifications:bell")):
        return redirect(back)
    return redirect("dashboard")

from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.shortcuts import redirect, render
from django.templatetags.static import static

from hosts.models import VM, Host
from kvmweb.access import scoped
from migrations_app.masking import HostMask
from migrations_app.models import MigrationJob


@login_required
def dashboard(request):
    hosts = scoped(Host, request.user).order_by("name")
    vms = scoped(VM, request.user).filter(gone=False)
    by_state = dict(vms.values_list("state").annotate(n=Count("id")))
    jobs = scoped(MigrationJob, request.user).select_related("vm")[:10]
    return render(
        request,
        "dashboard.html",
        {
            "hosts": hosts.annotate(vm_count=Count("vms")),
            "vm_states": [
                (label, by_state.get(state, 0), state) for state, label in VM.STATES if by_state.get(state)
            ],
            "vm_total": sum(by_state.values()),
            "jobs": HostMask.for_user(request.user).jobs(jobs),
        },
    )


def favicon(request):
    """Browsers ask for /favicon.ico whatever the page links: point them at the icon."""
    return redirect(static("favicon.svg"), permanent=True)

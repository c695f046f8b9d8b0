"""Host and VM list pieces rendered in Python (lists render them once per row).

``{% vm_actions vm %}``: a VM's Migrate link and power buttons.
``{{ host|host_memory }}``: a host's memory, one definition for every page.
``{{ host|tls_certificate }}``: kvmweb's TLS client certificate for it (list warnings).

The VM list renders fifty of these per page; as template markup they cost more than the
page's queries. Which buttons show follows the state the inventory knows; the service
asks libvirt again before acting (hosts/services.py do_vm_power). Power buttons submit the
page's hidden ``vm-power`` form (one form, ``formaction`` per button), so the row needs no
form of its own and no script.
"""

from django import template
from django.urls import reverse
from django.utils.html import escape, format_html
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _

from hosts.models import VM
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.accounts.roles import is_self_service, is_staff_migrator
from kvmweb.accounts.templatetags.kvmweb_format import binary_size

register = template.Library()

# action -> the states (as the inventory knows them) in which the button is offered
OFFERED = [
    ("start", {"shutoff", "crashed"}),
    ("shutdown", {"running", "paused", "blocked"}),
    ("reboot", {"running", "blocked"}),
    ("destroy", {"running", "paused", "blocked", "shutdown", "crashed", "pmsuspended"}),
]


def _policy_groups(user):
    """For a self-service user: the host groups whose VMs a policy lets them move (one
    query per page), so the Migrate link shows only where the wizard can go on. None for
    everyone else (staff may move any VM; the wizard has the last word either way)."""
    if is_staff_migrator(user) or not is_self_service(user):
        return None
    with_targets = SelfServicePolicy.objects.filter(target_groups__isnull=False)
    return set(with_targets.values_list("source_group_id", flat=True))


def _setup(request):
    """Per request: rights, URLs and labels (the same for every row)."""
    cached = getattr(request, "_kvmweb_vm_actions", None)
    if cached is None:
        user = request.user
        cached = request._kvmweb_vm_actions = {
            "migrate": user.has_perm("migrations_app.add_migrationjob"),
            "policy_groups": _policy_groups(user),
            "power": user.has_perm("hosts.power_vm"),
            "wizard": reverse("migrations:new"),
            "power_url": reverse("hosts:vm_power", args=[0]).replace("/0/", "/{}/"),
            "labels": {
                "migrate": _("Migrate"),
                "start": _("Start"),
                "shutdown": _("Shut down"),
                "reboot": _("Reboot"),
                "destroy": _("Force off"),
            },
            "confirm": {
                "reboot": _("Reboot %(name)s?"),
                "destroy": _(
                    "Force %(name)s off now? Like pulling the plug: unsaved data in the guest is lost."
                ),
            },
        }
    return cached


@register.simple_tag(takes_context=True)
def vm_actions(context, vm, size="sm", migrate=True):
    setup = _setup(context["request"])
    if vm.host_id is None or vm.gone or vm.pk in context.get("busy", ()):
        return ""
    # Plain string building: labels are escaped once per request (in _setup), the URLs
    # are ours and the id an integer; only the VM's name is escaped here, per row.
    cls = f"btn {size}".strip()
    parts = []
    groups = setup["policy_groups"]
    if migrate and setup["migrate"] and (groups is None or vm.host.group_id in groups):
        parts.append(
            f'<a class="{cls}" href="{setup["wizard"]}?vm={vm.pk}" data-testid="migrate-{vm.pk}">'
            f"{setup['labels']['migrate']}</a>"
        )
    if setup["power"]:
        url = setup["power_url"].format(vm.pk)
        name = escape(vm.name)
        for action, states in OFFERED:
            if vm.state not in states:
                continue
            confirm = setup["confirm"].get(action)
            extra = f' data-confirm="{confirm}" data-name="{name}"' if confirm else ""
            danger = " danger" if action == "destroy" else ""
            parts.append(
                f'<button class="{cls}{danger}" type="submit" form="vm-power" formaction="{url}" '
                f'name="action" value="{action}"{extra}>{setup["labels"][action]}</button>'
            )
    if not parts:
        return ""
    return mark_safe('<span class="rowactions">' + "".join(parts) + "</span>")  # every part escaped above


@register.simple_tag(takes_context=True)
def vm_power_form(context):
    """The hidden form the power buttons submit (once per page), back to this page."""
    request = context["request"]
    if not _setup(request)["power"]:
        return ""
    return format_html(
        '<form id="vm-power" method="post" hidden><input type="hidden" name="csrfmiddlewaretoken" value="{}">'
        '<input type="hidden" name="next" value="{}"></form>',
        context.get("csrf_token", ""),
        request.get_full_path(),
    )


@register.filter
def tls_certificate(host):
    """kvmweb's TLS client certificate for ``host`` (hosts/transport.py), or None when
    the host is not qemu+tls.  Reads one small file per TLS host."""
    from hosts import transport

    return transport.client_certificate(host.uri)


@register.filter
def host_memory(host):
    """Free memory as libvirt reports it (virNodeGetFreeMemory) of the physical total
    (virNodeGetInfo), both from the last probe, in binary units: the host list, the host
    page and the dashboard show the same figures the same way."""
    if not host.memory_total:
        return "—"
    return format_html(
        '<span title="{}">{}</span>',
        _(
            "Free memory as libvirt reports it (virNodeGetFreeMemory) of the physical total "
            "(virNodeGetInfo), at the last probe"
        ),
        _("%(free)s free of %(total)s")
        % {"free": binary_size(host.memory_free), "total": binary_size(host.memory_total)},
    )


@register.simple_tag(takes_context=True)
def vm_rows(context, vms, selectable=False, hide_host=False, actions=False):
    """The ``<tr>`` rows of a VM table (templates/hosts/partials/vm_table.html has the
    header). Built as strings with every value escaped: a page of fifty rows as template
    markup cost about as much as all of the page's queries."""
    request = context["request"]
    states = getattr(request, "_kvmweb_state_labels", None)
    if states is None:
        states = request._kvmweb_state_labels = {value: escape(label) for value, label in VM.STATES}
    detail = reverse("hosts:vm_detail", args=[0]).replace("/0/", "/{}/")
    busy = context.get("busy", ())
    stale_on = escape(_("A stale definition of this VM exists on")) if context.get("sees_everything") else ""
    stale, gone, migrating = escape(_("stale copy")), escape(_("gone")), escape(_("migrating"))
    rows = []
    for vm in vms:
        pk, name = vm.pk, escape(vm.name)
        cells = []
        if selectable:
            cells.append(
                f'<td class="pick"><input type="checkbox" name="vm" value="{pk}" data-select="vm" '
                f'aria-label="{name}"></td>'
            )
        badge = ""
        if vm.stale_hosts:
            title = f' title="{stale_on} {escape(", ".join(vm.stale_hosts))}"' if stale_on else ""
            badge = f' <span class="badge warn"{title}>{stale}</span>'
        cells.append(f'<td><a href="{detail.format(pk)}">{name}</a>{badge}</td>')
        if vm.gone:
            state = f'<span class="badge gone">{gone}</span>'
        else:
            state = f'<span class="badge {escape(vm.state)}">{states.get(vm.state, escape(vm.state))}</span>'
        if pk in busy:
            state += f' <span class="badge running job">{migrating}</span>'
        cells.append(f"<td>{state}</td>")
        if not hide_host:
            cells.append(f"<td>{escape(vm.host.name) if vm.host_id else '—'}</td>")
        owner = escape(vm.owner_user.username) if vm.owner_user_id else ""
        if vm.owner_group_id:
            owner += " " + escape(vm.owner_group.name)
        cells.append(
            f'<td class="num">{int(vm.vcpus)}</td><td class="num">{binary_size(vm.memory)}</td>'
            f"<td>{len(vm.disks or [])}</td><td>{owner}</td>"
            f'<td class="mono muted hide-narrow">{escape(vm.uuid)}</td>'
        )
        if actions:
            cells.append(f'<td class="actions">{vm_actions(context, vm)}</td>')
        rows.append(f'<tr data-vm="{pk}">' + "".join(cells) + "</tr>")
    if not rows:
        rows.append(f'<tr><td colspan="10" class="muted">{escape(_("No VMs."))}</td></tr>')
    return mark_safe("\n".join(rows))  # every value escaped above

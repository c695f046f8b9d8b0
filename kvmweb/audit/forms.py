import re
from datetime import datetime, time

from django import forms
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext_lazy

from kvmweb.audit.models import AuditEvent

# "hosts.vm:12": one exact object (type and id), as the VM history links to it.
OBJECT_REF = re.compile(r"^(?P<type>[a-z_]+\.[a-z_]+):(?P<id>[^\s:]+)$")


class AuditFilterForm(forms.Form):
    """The audit page's filters; the same form filters the CSV and JSON exports."""

    who = forms.CharField(
        label=_("Who"), required=False, widget=forms.TextInput(attrs={"placeholder": _("user name")})
    )
    action = forms.CharField(
        label=_("What"),
        required=False,
        widget=forms.TextInput(attrs={"placeholder": _("e.g. host. or vm.owner")}),
    )
    target = forms.CharField(
        label=_("Which object"),
        required=False,
        widget=forms.TextInput(attrs={"placeholder": _("name, or hosts.vm:12")}),
    )
    since = forms.DateField(
        label=pgettext_lazy("date range", "From"),
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
    )
    until = forms.DateField(label=_("Until"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    outcome = forms.ChoiceField(label=_("Outcome"), required=False)
    ip = forms.GenericIPAddressField(label=_("Address"), required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["outcome"].choices = [("", _("any"))] + AuditEvent.OUTCOMES

    def filter(self, events):
        """Apply the valid filters to ``events`` (invalid input filters nothing out,
        and the form shows the error)."""
        data = self.cleaned_data if self.is_valid() else {}
        if data.get("who"):
            events = events.filter(actor_name__icontains=data["who"].strip())
        if data.get("action"):
            events = events.filter(action__startswith=data["action"].strip())
        target = (data.get("target") or "").strip()
        if target:
            ref = OBJECT_REF.match(target)
            if ref:
                events = events.filter(target_type=ref["type"], target_id=ref["id"])
            else:
                events = events.filter(target_name__icontains=target)
        tz = timezone.get_current_timezone()
        if data.get("since"):
            events = events.filter(at__gte=datetime.combine(data["since"], time.min, tzinfo=tz))
        if data.get("until"):
            events = events.filter(at__lte=datetime.combine(data["until"], time.max, tzinfo=tz))
        if data.get("outcome"):
            events = events.filter(outcome=data["outcome"])
        if data.get("ip"):
            events = events.filter(ip=data["ip"])
        return events

    def active_filters(self):
        """The filters in use, as text (for the export's own audit event)."""
        if not self.is_valid():
            return {}
        return {k: str(v) for k, v in self.cleaned_data.items() if v not in (None, "")}

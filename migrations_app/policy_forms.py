"""Forms of the self-service policy and approval pages."""

from django import forms
from django.utils.translation import gettext_lazy as _

from hosts.models import HostGroup
from migrations_app.models import MigrationJob


class PolicyForm(forms.Form):
    source_group = forms.ModelChoiceField(label=_("For VMs on hosts of"), queryset=HostGroup.objects.all())
    target_groups = forms.ModelMultipleChoiceField(
        label=_("They may move them to hosts of"),
        queryset=HostGroup.objects.all(),
        widget=forms.CheckboxSelectMultiple,
        required=False,
    )
    allowed_modes = forms.MultipleChoiceField(
        label=_("Allowed modes"), widget=forms.CheckboxSelectMultiple, required=False
    )
    max_bandwidth = forms.IntegerField(
        label=_("Highest bandwidth (MiB/s)"),
        min_value=1,
        required=False,
        help_text=_("Empty: no cap. With a cap, requests without a limit are refused."),
    )
    requires_approval = forms.BooleanField(
        label=_("Requests wait for an operator's approval"), required=False, initial=True
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["allowed_modes"].choices = MigrationJob.MODES


class RejectForm(forms.Form):
    reason = forms.CharField(
        label=_("Reason (shown to the requester)"), max_length=1000, widget=forms.Textarea(attrs={"rows": 2})
    )

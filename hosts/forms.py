from django import forms
from django.utils.translation import gettext_lazy as _

from hosts.models import HostGroup
from hosts.uris import InvalidURI, validate_uri


class HostForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100)
    uri = forms.CharField(
        label=_("libvirt URI"),
        max_length=500,
        help_text=_("For example qemu+ssh://root@kvm1.example.com/system or qemu+tls://kvm1/system"),
    )
    group = forms.ModelChoiceField(label=_("Host group"), queryset=HostGroup.objects.all(), required=False)
    description = forms.CharField(
        label=_("Description"), widget=forms.Textarea(attrs={"rows": 2}), required=False
    )

    def clean_uri(self):
        try:
            return validate_uri(self.cleaned_data["uri"])
        except InvalidURI as exc:
            raise forms.ValidationError(str(exc)) from None


class VMFilterForm(forms.Form):
    q = forms.CharField(label=_("Name"), required=False)
    host = forms.IntegerField(required=False)
    state = forms.CharField(required=False)
    gone = forms.BooleanField(label=_("Include gone"), required=False)

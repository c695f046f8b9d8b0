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


class ConnectForm(forms.Form):
    """The add-host wizard's answers; ``uri()`` turns them into a libvirt URI."""

    transport = forms.ChoiceField(
        label=_("Transport"),
        choices=[
            ("ssh", _("SSH (kvmweb's key, host key confirmed here)")),
            ("tls", _("TLS (client certificate)")),
            ("tcp", _("TCP without encryption (lab or trusted network only)")),
        ],
    )
    user = forms.CharField(label=_("SSH user"), max_length=64, required=False, initial="root")
    address = forms.CharField(label=_("Host name or address"), max_length=253)
    port = forms.IntegerField(label=_("Port"), min_value=1, max_value=65535, required=False)
    pkipath = forms.CharField(label=_("TLS certificate directory (pkipath)"), max_length=300, required=False)

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        from hosts import transport

        try:
            data["uri"] = validate_uri(
                transport.build_uri(
                    data["transport"],
                    data["address"],
                    user=data.get("user") or "root",
                    port=data.get("port"),
                    pkipath=data.get("pkipath") or "",
                )
            )
        except InvalidURI as exc:
            raise forms.ValidationError(str(exc)) from None
        return data

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils.translation import gettext_lazy as _

from hosts.models import Host, HostGroup
from hosts.services import KEEP as KEEP_OWNER
from hosts.uris import InvalidURI, validate_uri
from kvmweb.accounts.roles import ROLES

KEEP, NOBODY = "keep", "none"  # the owner form's choices for "leave as is" and "clear"


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


class HostEditForm(HostForm):
    """The host's Edit page: HostForm plus the migration port range of its qemu.conf."""

    migration_port_min = forms.IntegerField(
        label=_("Migration ports from"),
        min_value=1,
        max_value=65535,
        required=False,
        help_text=_("migration_port_min in the host's qemu.conf; empty: QEMU's default 49152"),
    )
    migration_port_max = forms.IntegerField(
        label=_("Migration ports to"),
        min_value=1,
        max_value=65535,
        required=False,
        help_text=_("migration_port_max in the host's qemu.conf; empty: QEMU's default 49215"),
    )

    def clean(self):
        data = super().clean()
        lo, hi = data.get("migration_port_min"), data.get("migration_port_max")
        if (lo is None) != (hi is None):
            raise forms.ValidationError(_("Give both ends of the migration port range, or neither."))
        if lo is not None and hi is not None and lo > hi:
            raise forms.ValidationError(_("The migration port range ends before it starts."))
        return data


class CertificateForm(forms.Form):
    """A qemu+tls host's own client certificate: three PEM texts, or a pkipath directory."""

    ca_pem = forms.CharField(
        label=_("CA certificate (cacert.pem)"), widget=forms.Textarea(attrs={"rows": 4}), required=False
    )
    cert_pem = forms.CharField(
        label=_("Client certificate (clientcert.pem)"),
        widget=forms.Textarea(attrs={"rows": 4}),
        required=False,
    )
    key_pem = forms.CharField(
        label=_("Client key (clientkey.pem)"),
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off"}),
        required=False,
        help_text=_("Stored by kvmweb with mode 0600; never shown again."),
    )
    pkipath = forms.CharField(
        label=_("Or: a certificate directory (pkipath)"),
        max_length=300,
        required=False,
        help_text=_("An absolute directory holding cacert.pem, clientcert.pem and clientkey.pem."),
    )

    def __init__(self, *args, bundle_only=False, **kwargs):
        super().__init__(*args, **kwargs)
        if bundle_only:  # a host not registered yet: the wizard has its own pkipath field
            del self.fields["pkipath"]

    def clean(self):
        data = super().clean()
        pems = [data.get(k, "").strip() for k in ("ca_pem", "cert_pem", "key_pem")]
        if data.get("pkipath", "").strip():
            if any(pems):
                raise forms.ValidationError(_("Give either the three PEM texts or a directory, not both."))
        elif not all(pems):
            raise forms.ValidationError(_("Give the CA certificate, the client certificate and its key."))
        return data


class VMFilterForm(forms.Form):
    q = forms.CharField(label=_("Name"), required=False)
    host = forms.IntegerField(required=False)
    state = forms.CharField(required=False)
    gone = forms.BooleanField(label=_("Include gone"), required=False)


def owner_groups():
    """Groups that may own VMs: any group except the role groups (owning a VM through
    "Self-service" would hand it to every self-service user)."""
    return Group.objects.exclude(name__in=ROLES).order_by("name")


class OwnerForm(forms.Form):
    """Owner user and group; "keep" leaves that part unchanged, "nobody" clears it."""

    owner_user = forms.ChoiceField(label=_("Owner (user)"))
    owner_group = forms.ChoiceField(label=_("Owner (group)"))

    def __init__(self, *args, keep=True, **kwargs):
        super().__init__(*args, **kwargs)
        head = [(KEEP, _("— keep as is —"))] if keep else []
        head.append((NOBODY, _("— nobody —")))
        users = get_user_model().objects.filter(is_active=True).order_by("username")
        self.fields["owner_user"].choices = head + [(str(u.pk), u.get_username()) for u in users]
        self.fields["owner_group"].choices = head + [(str(g.pk), g.name) for g in owner_groups()]

    def _resolve(self, value, queryset):
        if value == KEEP:
            return KEEP_OWNER
        if value == NOBODY:
            return None
        return queryset.get(pk=int(value))

    def owners(self):
        """(owner_user, owner_group) for do_set_owner (services.KEEP, None or an object)."""
        users = get_user_model().objects.filter(is_active=True)
        return (
            self._resolve(self.cleaned_data["owner_user"], users),
            self._resolve(self.cleaned_data["owner_group"], owner_groups()),
        )


class OwnershipFilterForm(forms.Form):
    q = forms.CharField(label=_("Name"), required=False)
    host = forms.ModelChoiceField(label=_("Host"), queryset=Host.objects.all(), required=False)
    group = forms.ModelChoiceField(label=_("Host group"), queryset=HostGroup.objects.all(), required=False)
    owner = forms.CharField(label=_("Owner"), required=False, help_text=_("user or group name"))
    unowned = forms.BooleanField(label=_("Only VMs without owner"), required=False)


class HostGroupForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=100)
    description = forms.CharField(
        label=_("Description"), widget=forms.Textarea(attrs={"rows": 2}), required=False
    )
    hosts = forms.ModelMultipleChoiceField(
        label=_("Hosts"),
        queryset=Host.objects.all(),
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text=_("A host belongs to one group; picking it here moves it from its current group."),
    )


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

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils.translation import gettext_lazy as _

from hosts.models import Host, HostGroup
from kvmweb.accounts.roles import ROLES

KEEP, NOBODY = "keep", "none"


class NewUserForm(forms.Form):
    username = forms.RegexField(
        label=_("Username"),
        max_length=150,
        regex=r"^[\w.@+-]+$",
        help_text=_("Letters, digits and @ . + - _ only."),
    )
    password = forms.CharField(label=_("Password"), widget=forms.PasswordInput, strip=False)
    roles = forms.MultipleChoiceField(
        label=_("Roles"),
        choices=[(role, _(role)) for role in ROLES],
        widget=forms.CheckboxSelectMultiple,
        required=False,
    )

    def clean(self):
        """The password validators see the user name too: a password like the name is refused."""
        from django.contrib.auth import password_validation

        cleaned = super().clean()
        password = cleaned.get("password")
        if password:
            candidate = get_user_model()(username=cleaned.get("username") or "")
            try:
                password_validation.validate_password(password, user=candidate)
            except forms.ValidationError as exc:
                self.add_error("password", exc)
        return cleaned


class RolesForm(forms.Form):
    roles = forms.MultipleChoiceField(
        label=_("Roles"),
        choices=[(role, _(role)) for role in ROLES],
        widget=forms.CheckboxSelectMultiple,
        required=False,
    )
    active = forms.BooleanField(
        label=_("Account enabled"),
        required=False,
        help_text=_("A disabled account cannot sign in; its open sessions end at once."),
    )


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
        from kvmweb.accounts.services import KEEP as KEEP_OWNER

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
        from migrations_app.models import MigrationJob

        self.fields["allowed_modes"].choices = MigrationJob.MODES


class RejectForm(forms.Form):
    reason = forms.CharField(
        label=_("Reason (shown to the requester)"), max_length=1000, widget=forms.Textarea(attrs={"rows": 2})
    )

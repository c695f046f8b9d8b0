from django import forms
from django.contrib.auth import get_user_model
from django.utils.translation import gettext_lazy as _

from kvmweb.accounts.roles import ROLES


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

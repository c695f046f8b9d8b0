"""Forms of the migration wizard and the job controls."""

from django import forms
from django.utils.translation import gettext_lazy as _

from migrations_app.models import MigrationJob
from migrations_app.options import SCHEMA, OptionError, clean_control

CHOICE_LABELS = {
    "abort": _("abort"),
    "postcopy": _("switch to post-copy"),
    "all": _("full copy"),
    "inc": _("incremental"),
}


def _field(option):
    """A form field for one option of the schema. Numbers and choices are checked by the
    schema in OptionsForm.clean (the same words as the CLI and the policy), not here."""
    if option.kind == "bool":
        return forms.BooleanField(label=option.label, required=False, initial=option.default)
    if option.kind == "choice":
        return forms.ChoiceField(
            label=option.label,
            choices=[(c, CHOICE_LABELS.get(c, c)) for c in option.choices],
            required=False,
            initial=option.default,
        )
    attrs = {}
    if option.kind == "int":
        attrs = {"min": option.minimum, "step": 1, "inputmode": "numeric"}
        if option.maximum is not None:
            attrs["max"] = option.maximum
    return forms.CharField(label=option.label, required=False, widget=forms.TextInput(attrs=attrs))


class OptionsForm(forms.Form):
    """Mode and options (step 3), one field per option of migrations_app/options.py.
    Empty fields mean "libvirt's default"; the schema validates and normalizes."""

    mode = forms.ChoiceField(label=_("Mode"), choices=MigrationJob.MODES, widget=forms.RadioSelect)

    def clean(self):
        data = super().clean()
        for name, option in SCHEMA.items():
            if name not in data:
                continue
            try:
                data[name] = option.clean(data[name])
            except OptionError as exc:
                self.add_error(name, str(exc))
        return data

    def options(self):
        """The options dict for the plan: booleans always, other fields when set."""
        data = self.cleaned_data
        out = {}
        for name, option in SCHEMA.items():
            value = data.get(name)
            if option.kind == "bool":
                out[name] = bool(value)
            elif value not in (None, ""):
                out[name] = value
        return out


OptionsForm.base_fields.update({name: _field(option) for name, option in SCHEMA.items()})


class BandwidthForm(forms.Form):
    bandwidth = forms.CharField(label=_("Bandwidth (MiB/s, 0 = unlimited)"))

    def clean_bandwidth(self):
        try:
            return clean_control("bandwidth", self.cleaned_data["bandwidth"])
        except OptionError as exc:
            raise forms.ValidationError(str(exc)) from None


class DowntimeForm(forms.Form):
    downtime = forms.CharField(label=_("Maximum downtime (ms)"))

    def clean_downtime(self):
        try:
            return clean_control("max_downtime", self.cleaned_data["downtime"])
        except OptionError as exc:
            raise forms.ValidationError(str(exc)) from None

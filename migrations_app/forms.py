"""Forms of the migration wizard and the job controls."""

from django import forms
from django.utils.translation import gettext_lazy as _

from migrations_app.models import MigrationJob


class OptionsForm(forms.Form):
    """Mode and options (step 3). Empty fields mean "libvirt's default"; the plan
    (migrations_app.plan.parse_options) normalizes and drops what a mode does not use."""

    mode = forms.ChoiceField(label=_("Mode"), choices=MigrationJob.MODES, widget=forms.RadioSelect)
    bandwidth = forms.IntegerField(label=_("Bandwidth limit (MiB/s)"), min_value=1, required=False)
    max_downtime = forms.IntegerField(label=_("Maximum downtime (ms)"), min_value=1, required=False)
    persist = forms.BooleanField(label=_("Keep the VM defined on the target"), required=False, initial=True)
    undefine_source = forms.BooleanField(
        label=_("Remove the definition from the source"), required=False, initial=True
    )
    auto_converge = forms.BooleanField(label=_("Auto-converge (throttle the guest CPU)"), required=False)
    compression = forms.BooleanField(label=_("Compression"), required=False)
    parallel = forms.IntegerField(label=_("Parallel connections"), min_value=2, max_value=255, required=False)
    postcopy = forms.BooleanField(
        label=_("Enable post-copy (switch later from the job page)"), required=False
    )
    completion_timeout = forms.IntegerField(label=_("Completion timeout (s)"), min_value=1, required=False)
    completion_action = forms.ChoiceField(
        label=_("At the timeout"),
        choices=[("abort", _("abort")), ("postcopy", _("switch to post-copy"))],
        required=False,
    )
    tunnelled = forms.BooleanField(label=_("Tunnelled through libvirtd"), required=False)
    migrate_uri = forms.CharField(label=_("Migration URI (tcp://address)"), required=False)
    copy_storage = forms.ChoiceField(
        label=_("Storage copy"),
        choices=[("all", _("full copy")), ("inc", _("incremental"))],
        required=False,
    )
    remove_source_disks = forms.BooleanField(label=_("Delete the source disks after success"), required=False)
    shutdown_timeout = forms.IntegerField(label=_("Shutdown timeout (s)"), min_value=1, required=False)
    force_off = forms.BooleanField(label=_("Force off when the guest does not shut down"), required=False)
    start_on_target = forms.BooleanField(label=_("Start on the target afterwards"), required=False)

    BOOLEANS = (
        "persist",
        "undefine_source",
        "auto_converge",
        "compression",
        "postcopy",
        "tunnelled",
        "remove_source_disks",
        "force_off",
        "start_on_target",
    )

    def options(self):
        """The options dict for the plan: booleans always, other fields when set."""
        data = self.cleaned_data
        out = {}
        for name in self.fields:
            if name == "mode":
                continue
            value = data.get(name)
            if name in self.BOOLEANS:
                out[name] = bool(value)
            elif value not in (None, ""):
                out[name] = value
        return out


class BandwidthForm(forms.Form):
    bandwidth = forms.IntegerField(label=_("Bandwidth (MiB/s, 0 = unlimited)"), min_value=0)


class DowntimeForm(forms.Form):
    downtime = forms.IntegerField(label=_("Maximum downtime (ms)"), min_value=1)

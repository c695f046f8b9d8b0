"""Self-service policies: what owners of VMs may do, per host group.

The role groups themselves are plain Django groups (kvmweb/accounts/roles.py); the only
model of this app is the policy an administrator sets between host groups.
"""

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from kvmweb.accounts.roles import sees_everything
from kvmweb.accounts.scope import check_action


class SelfServicePolicyQuerySet(models.QuerySet):
    def restrict(self, user, action="view"):
        """Scope rule: the staff roles see every policy; nobody else sees any (a
        self-service user learns what applies to a VM from the wizard's reasons)."""
        check_action(action)
        if not user.is_authenticated or not sees_everything(user):
            return self.none()
        return self


class SelfServicePolicy(models.Model):
    """What a self-service user may do with a VM that runs on a host of ``source_group``.

    They may migrate it to hosts of ``target_groups`` only, with one of ``allowed_modes``,
    with a bandwidth cap of at most ``max_bandwidth`` MiB/s (None: no cap required), and
    the request waits for an operator when ``requires_approval`` is set. A VM on a host
    without a group, or in a group without a policy, cannot be moved by self-service.
    One policy per source group keeps the rule a person can read at a glance.
    """

    source_group = models.OneToOneField(
        "hosts.HostGroup",
        on_delete=models.CASCADE,
        related_name="self_service_policy",
        verbose_name=_("VMs on hosts of"),
    )
    target_groups = models.ManyToManyField(
        "hosts.HostGroup", related_name="+", blank=True, verbose_name=_("may move to hosts of")
    )
    allowed_modes = models.JSONField(_("allowed modes"), default=list, blank=True)
    max_bandwidth = models.PositiveIntegerField(
        _("highest bandwidth (MiB/s)"),
        null=True,
        blank=True,
        help_text=_("Leave empty for no cap. With a cap, unlimited requests are refused."),
    )
    requires_approval = models.BooleanField(_("needs an operator's approval"), default=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = SelfServicePolicyQuerySet.as_manager()

    class Meta:
        ordering = ["source_group__name"]
        verbose_name = _("self-service policy")
        verbose_name_plural = _("self-service policies")

    def __str__(self):
        return str(_("Self-service policy for %(group)s") % {"group": self.source_group})

    def as_dict(self):
        """A plain description for audit details (names as text)."""
        return {
            "source_group": self.source_group.name,
            "target_groups": sorted(g.name for g in self.target_groups.all()),
            "allowed_modes": list(self.allowed_modes),
            "max_bandwidth": self.max_bandwidth,
            "requires_approval": self.requires_approval,
        }


class UserPreference(models.Model):
    """One user's display preferences (for now the colour theme).

    Stored per user, so the choice follows them to every browser; the session caches it
    (kvmweb.context_processors.site), so a page reads this row once per session at most.
    """

    AUTO, LIGHT, DARK = "auto", "light", "dark"
    THEMES = [(AUTO, _("as the system")), (LIGHT, _("light")), (DARK, _("dark"))]

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="kvmweb_preference"
    )
    theme = models.CharField(max_length=8, choices=THEMES, default=AUTO)

    def __str__(self):
        return f"{self.user} {self.theme}"

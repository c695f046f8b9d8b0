"""The four roles and what each may do.

Roles are Django groups; capabilities are model permissions attached to the groups.
ROLE_PERMISSIONS is the single source of truth: the data migration and every `migrate`
(post_migrate) sync the groups to it, so adding a permission here is all it takes.
"""

from django.utils.translation import gettext_noop

ADMINISTRATOR = gettext_noop("Administrator")
OPERATOR = gettext_noop("Operator")
AUDITOR = gettext_noop("Auditor")
SELF_SERVICE = gettext_noop("Self-service")
ROLES = [ADMINISTRATOR, OPERATOR, AUDITOR, SELF_SERVICE]

_READ_ALL = [
    "hosts.view_host",
    "hosts.view_hostgroup",
    "hosts.view_vm",
    "migrations_app.view_migrationjob",
    "audit.view_auditevent",
    "accounts.view_selfservicepolicy",
    "api.view_metrics",
    "fleet.view_batch",
]
ROLE_PERMISSIONS = {
    ADMINISTRATOR: _READ_ALL
    + [
        "hosts.add_host",
        "hosts.change_host",
        "hosts.delete_host",
        "hosts.add_hostgroup",
        "hosts.change_hostgroup",
        "hosts.delete_hostgroup",
        "hosts.change_vm",
        "hosts.power_vm",
        "hosts.sync_host",
        "hosts.maintain_host",
        "migrations_app.add_migrationjob",
        "migrations_app.cancel_migrationjob",
        "migrations_app.control_migrationjob",
        "migrations_app.approve_migrationjob",
        "migrations_app.override_preflight",
        "migrations_app.delete_leftcopy",
        "accounts.add_selfservicepolicy",
        "accounts.change_selfservicepolicy",
        "accounts.delete_selfservicepolicy",
        "auth.view_user",
        "auth.add_user",
        "auth.change_user",
        "auth.view_group",
    ],
    OPERATOR: _READ_ALL
    + [
        "hosts.sync_host",
        "hosts.power_vm",
        "hosts.maintain_host",
        "migrations_app.add_migrationjob",
        "migrations_app.cancel_migrationjob",
        "migrations_app.control_migrationjob",
        "migrations_app.approve_migrationjob",
        "migrations_app.delete_leftcopy",
    ],
    # "Read everything": also who holds which role.
    AUDITOR: _READ_ALL + ["auth.view_user", "auth.view_group"],
    # Owners may power their own VMs (scope limits them to those), like a cloud console.
    SELF_SERVICE: [
        "hosts.view_vm",
        "hosts.view_host",
        "hosts.power_vm",
        "migrations_app.view_migrationjob",
        "migrations_app.add_migrationjob",
        "migrations_app.cancel_migrationjob",
    ],
}


def sync_roles(apps=None):
    """Create the role groups and give each exactly its permissions (idempotent).

    Permissions that do not exist yet (an app not migrated yet) are skipped; the
    post_migrate hook runs this again once they do.
    """
    if apps is None:
        from django.apps import apps
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, perms in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        wanted = []
        for perm in perms:
            app_label, codename = perm.split(".")
            wanted += list(Permission.objects.filter(content_type__app_label=app_label, codename=codename))
        group.permissions.set(wanted)


def sync_roles_after_migrate(sender, **kwargs):
    sync_roles()


def _group_names(user):
    # Cached on the user object for the request: scope checks run many times per page.
    if not hasattr(user, "_kvmweb_groups"):
        user._kvmweb_groups = set(user.groups.values_list("name", flat=True))
    return user._kvmweb_groups


def has_role(user, role):
    return user.is_authenticated and (
        user.is_superuser and role == ADMINISTRATOR or role in _group_names(user)
    )


def sees_everything(user):
    """Administrators, operators and auditors may see every host, VM, job and event."""
    if not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    return bool(_group_names(user) & {ADMINISTRATOR, OPERATOR, AUDITOR})


def is_self_service(user):
    return user.is_authenticated and not sees_everything(user) and SELF_SERVICE in _group_names(user)


def is_staff_migrator(user):
    """Administrators and operators may migrate any VM anywhere, no approval needed."""
    return user.is_authenticated and (has_role(user, ADMINISTRATOR) or has_role(user, OPERATOR))

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class AccountsConfig(AppConfig):
    name = "kvmweb.accounts"
    label = "accounts"
    verbose_name = "Accounts and roles"

    def ready(self):
        from kvmweb.accounts.roles import sync_roles_after_migrate

        # Permissions of apps migrated after our data migration (or added later) are
        # attached to the role groups after every `migrate`, idempotently.
        post_migrate.connect(sync_roles_after_migrate, dispatch_uid="kvmweb.sync_roles")

from django.apps import AppConfig
from django.db.models.signals import post_migrate, pre_delete


class UserDeletionRefused(Exception):
    """Accounts are disabled, never deleted: their audit events name them."""


def refuse_user_deletion(sender, instance, **kwargs):
    raise UserDeletionRefused(
        f"user {instance.get_username()!r} cannot be deleted: disable the account instead "
        "(its audit events must keep pointing at it)"
    )


class AccountsConfig(AppConfig):
    name = "kvmweb.accounts"
    label = "accounts"
    verbose_name = "Accounts and roles"

    def ready(self):
        from kvmweb.accounts.roles import sync_roles_after_migrate

        # Permissions of apps migrated after our data migration (or added later) are
        # attached to the role groups after every `migrate`, idempotently.
        post_migrate.connect(sync_roles_after_migrate, dispatch_uid="kvmweb.sync_roles")
        from django.contrib.auth import get_user_model

        # No page deletes users (there is no Django admin either); this keeps any later
        # code path (a command, an API) from trying, with a message instead of the audit
        # table's refusal to null the actor of their events.
        pre_delete.connect(
            refuse_user_deletion, sender=get_user_model(), dispatch_uid="kvmweb.no_user_delete"
        )

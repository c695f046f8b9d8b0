import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from kvmweb.accounts.roles import ADMINISTRATOR
from kvmweb.env import env_secret, env_str


class Command(BaseCommand):
    help = "Create the first administrator if no user exists (KVMWEB_ADMIN_PASSWORD or generated)."

    def handle(self, **options):
        User = get_user_model()
        if User.objects.exists():
            self.stdout.write("users exist; no administrator created")
            return
        username = env_str("KVMWEB_ADMIN_USER", "admin")
        try:
            password = env_secret("KVMWEB_ADMIN_PASSWORD")
            generated = False
        except Exception:
            password, generated = secrets.token_urlsafe(12), True
        user = User.objects.create_superuser(username=username, password=password, email="")
        user.groups.add(Group.objects.get(name=ADMINISTRATOR))
        if generated:
            self.stdout.write(
                self.style.WARNING(
                    f"Created administrator '{username}' with password: {password}\n"
                    "(shown once; set KVMWEB_ADMIN_PASSWORD to choose it)"
                )
            )
        else:
            self.stdout.write(
                f"Created administrator '{username}' with the password from KVMWEB_ADMIN_PASSWORD"
            )

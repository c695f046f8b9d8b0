"""`manage.py api_token USER [--name NAME] [--expires DAYS]` prints a new API token once.
`manage.py api_token USER --revoke PREFIX` revokes one. Both are audited (as the user the
token belongs to: whoever has a shell on the server can act as anyone anyway)."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from api import services
from api.models import ApiToken


class Command(BaseCommand):
    help = "Create (print once) or revoke an API token for USER."

    def add_arguments(self, parser):
        parser.add_argument("user")
        parser.add_argument("--name", default="command line")
        parser.add_argument(
            "--expires", type=int, default=None, metavar="DAYS", help="expires after DAYS days"
        )
        parser.add_argument("--revoke", metavar="PREFIX", help="revoke the token with this prefix")

    def handle(self, *args, **opts):
        user = get_user_model().objects.filter(username=opts["user"]).first()
        if user is None:
            raise CommandError(f"No user named {opts['user']!r}.")
        if opts["revoke"]:
            token = ApiToken.objects.filter(user=user, prefix=opts["revoke"]).first()
            if token is None:
                raise CommandError(f"{user.username} has no token with prefix {opts['revoke']!r}.")
            if not services.do_revoke_token(token, actor=user):
                raise CommandError("That token was already revoked.")
            self.stdout.write(f"Revoked {token.prefix}.")
            return
        if not user.is_active:
            raise CommandError(f"{user.username} is not active.")
        try:
            token, text = services.do_create_token(
                user, opts["name"], expires_days=opts["expires"], actor=user
            )
        except services.TokenError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(text)

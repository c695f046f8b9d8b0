"""Helpers shared by the fleet commands (acting user, host lookup, exit codes)."""

import os

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

BAD_ARGUMENTS = 2


def bad(command, message):
    """Bad arguments (or an object not visible / an action not allowed to the acting
    user, the command line's 404/403): CommandError, exit status 2."""
    raise CommandError(message, returncode=BAD_ARGUMENTS)


def acting_user(command, username):
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        bad(command, f"no kvmweb user {username!r} (use --user)")
    return user


def add_user_argument(parser):
    parser.add_argument(
        "--user",
        default=os.environ.get("KVMWEB_ADMIN_USER", "admin"),
        help="act as this kvmweb user (default: KVMWEB_ADMIN_USER or admin)",
    )

#!/usr/bin/env python3
"""Django's command-line utility for kvmweb."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
    # migrate_vm and preflight go to `manage.py cli_server` when it runs (no Django
    # start-up here; migrations_app/cliclient.py), otherwise they run below as before.
    from migrations_app import cliclient

    served = cliclient.run(sys.argv)
    if served is not None:
        sys.exit(served)
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)

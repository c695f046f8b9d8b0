"""A management command does not pay for the web server's or the API schema's imports:
daphne's app (Twisted's reactor) is installed only for runserver, and drf-spectacular's
schema machinery loads when a schema is built (kvmweb/settings.py, api/schema.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("daphne", "twisted", "drf_spectacular.openapi", "drf_spectacular.extensions", "api.schema")

PROBE = """
import json, sys
from django.core.management import ManagementUtility
utility = ManagementUtility(["manage.py", "migrate_vm", "--help"])
try:
    utility.execute()
except SystemExit:
    pass
sys.__stderr__.write(json.dumps(sorted(sys.modules)))
"""


def _modules_after(tmp_path, code, *argv):
    env = dict(os.environ, KVMWEB_DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="kvmweb.settings")
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    r = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


def _heavy(modules):
    return sorted(m for m in modules if m.split(".")[0] in ("daphne", "twisted") or m.startswith(HEAVY))


def test_it_runs_migrate_vm_help_without_daphne_or_the_schema_machinery(tmp_path):
    modules = _modules_after(tmp_path, PROBE)
    assert "migrations_app.management.commands.migrate_vm" in modules  # the probe did run it
    assert _heavy(modules) == []


def test_it_still_loads_the_schema_extension_when_drf_builds_a_schema(tmp_path):
    code = (
        "import json, sys, django; django.setup()\n"
        "from rest_framework.views import APIView\n"
        "schema = APIView().schema\n"
        "from drf_spectacular.extensions import OpenApiAuthenticationExtension as E\n"
        'sys.__stderr__.write(json.dumps([type(schema).__module__] + [str(getattr(c, "name", "")) for c in E._registry]))\n'
    )
    loaded = _modules_after(tmp_path, code)
    assert {"api.schema", "bearerAuth"} <= loaded

"""A migrations worker that dies at a journal step (used by test_journal_lab.py).

    KVMWEB_CRASH_AFTER_STEP=copy python tests/migrations_app/crash_worker.py VM TARGET MODE [OPTIONS_JSON]

Syncs the inventory, creates the job the way the wizard does (preflight, warnings
acknowledged), prints its id, then runs it with migrations_app.runner.run_job, the very
function the django-q2 task calls. The journal's test hook ends the process with exit
code 70 right after the named step, as if the worker had been killed there.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402

from hosts.models import VM, Host  # noqa: E402
from hosts.services import do_sync_inventory  # noqa: E402
from migrations_app.plan import MigrationPlan  # noqa: E402
from migrations_app.preflight import run_preflight  # noqa: E402
from migrations_app.runner import run_job  # noqa: E402
from migrations_app.services import do_create_job  # noqa: E402


def main(name, target_name, mode, options_json="{}"):
    options = json.loads(options_json)
    for host in Host.objects.all():
        do_sync_inventory(host)
    vm = VM.objects.get(name=name, gone=False)
    target = Host.objects.get(name=target_name)
    report = run_preflight(MigrationPlan(vm, vm.host, target, mode, options), measure_dirty_rate=False)
    if report.fails:
        print(json.dumps({"error": [(r.id, str(r.message)) for r in report.fails]}), flush=True)
        return 3
    admin = get_user_model().objects.get(username="admin")
    job = do_create_job(
        vm, target, mode, options, actor=admin, report=report, acknowledged=[r.id for r in report.warnings]
    )
    print(json.dumps({"id": job.pk}), flush=True)
    run_job(job.pk)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

#!/usr/bin/env bash
# test.sh — run every test. pytest's exit code is ours (5 = no tests ran = failure).
set -euo pipefail
cd "$(dirname "$0")/.."
# With arguments: just that pytest run. KVMWEB_SCALEOUT=0 skips the second pass below,
# KVMWEB_SCALEOUT=only runs only the second pass.
if [ $# -gt 0 ] || [ "${KVMWEB_SCALEOUT:-1}" = 0 ]; then exec .venv/bin/pytest "$@"; fi

# Pass 1: everything on the embedded default (SQLite, in-process channel layer).
status=0
[ "${KVMWEB_SCALEOUT:-1}" = only ] || .venv/bin/pytest || status=$?

# Pass 2: the scale-out tests plus the database-, worker- and streaming-related files,
# again on a throwaway PostgreSQL + Redis (scripts/services.sh, loopback, own temp dir,
# stopped on any exit). Lab and browser tests ran in pass 1 and are not repeated, except
# the scale-out lab test (a real migration through two clusters and two daphnes).
shopt -s nullglob
also=(tests/audit/test_*.py tests/kvmweb/test_health.py tests/api/test_*.py tests/notifications/test_*.py
  tests/migrations_app/test_{services,tasks,runner,claim,jobs,streaming,consumer,progress,lifecycle,cli_server,migrate_vm_cli}*.py
  tests/fleet/test_pipeline.py)
shopt -u nullglob
KVMWEB_SERVICES_DIR=$(mktemp -d /tmp/kvmweb-services.XXXXXX)
export KVMWEB_SERVICES_DIR
trap 'bash scripts/services.sh stop' EXIT
echo "test: pass 2 on PostgreSQL + Redis: tests/scaleout ${also[*]}"
eval "$(bash scripts/services.sh start)"
scaleout=0
# A hang must fail the run, not stall it: pass 2 normally takes about 3 minutes.
timeout --kill-after=30 900 .venv/bin/pytest -m "not browser and (scaleout or not lab)" \
  tests/scaleout "${also[@]}" || scaleout=$?
echo "test: pass 1 (SQLite) exit $status, pass 2 (PostgreSQL + Redis) exit $scaleout"
exit $((status != 0 ? status : scaleout))

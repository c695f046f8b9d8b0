#!/usr/bin/env bash
# run.sh — the site (daphne) and its workers (django-q2: default + migrations clusters)
# in one foreground command. Ctrl-C stops all of them.
set -euo pipefail
umask 077 # what kvmweb writes stays private (docs/security.md); settings.py sets it too
cd "$(dirname "$0")/.."
PORT=${KVMWEB_PORT:-8000}
ADDR=${KVMWEB_BIND:-127.0.0.1}
PY=.venv/bin/python
pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping kvmweb..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT
if (exec 3<>"/dev/tcp/$ADDR/$PORT") 2>/dev/null; then
  echo "port $ADDR:$PORT is already in use; set KVMWEB_PORT to another port"; exit 1
fi
# Metrics of earlier runs' processes would be added up by /metrics: start empty.
# (the same default as kvmweb/settings.py: PROMETHEUS_MULTIPROC_DIR, else DATA_DIR/prometheus)
rm -f "${PROMETHEUS_MULTIPROC_DIR:-${KVMWEB_DATA_DIR:-var}/prometheus}"/*.db
# Each child runs in its own session: a Ctrl-C reaches only this script, which then
# stops every child exactly once with SIGTERM. (django-q2's cluster hangs in shutdown
# when it gets the terminal's SIGINT and a SIGTERM on top of it.)
setsid $PY manage.py qcluster & pids+=($!)
Q_CLUSTER_NAME=migrations setsid $PY manage.py qcluster & pids+=($!)
# manage.py migrate_vm/preflight are handed to this (no Django start-up per command).
setsid $PY manage.py cli_server & pids+=($!)
# daphne through kvmweb.serve: request body, request time and WebSocket message limits.
setsid $PY -m kvmweb.serve -b "$ADDR" -p "$PORT" kvmweb.asgi:application & pids+=($!)
echo
echo "kvmweb is running at http://$ADDR:$PORT/"
echo "Sign in as the administrator created at first setup (user 'admin' unless KVMWEB_ADMIN_USER was set)."
echo "Press Ctrl-C to stop."
wait -n "${pids[@]}" || true

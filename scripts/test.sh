#!/usr/bin/env bash
# test.sh — run every test. pytest's exit code is ours (5 = no tests ran = failure).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/pytest "$@"

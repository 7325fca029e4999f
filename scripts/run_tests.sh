#!/usr/bin/env bash
# README command 2: set up the venv, the ComfyUI host and the browser (scripts/setup_env.sh test) and run the
# whole test suite (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/setup_env.sh test || exit 1  # it has said why
VENV=${SAEURON_VENV:-.venv}
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"

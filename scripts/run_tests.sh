#!/usr/bin/env bash
# README command 2: set up .venv and run the whole test suite (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "environment setup failed" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"

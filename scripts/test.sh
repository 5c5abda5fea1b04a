#!/usr/bin/env bash
# Set up rgkern and run the test suite. Extra arguments go to pytest (e.g. -x, -k name).
# Fails when pytest fails, and also when it collects no tests (pytest's exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
source scripts/setup.sh
set +e
"$PYTHON" -m pytest tests/ -q "$@"
code=$?
if [ "$code" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$code"

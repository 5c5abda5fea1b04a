#!/usr/bin/env bash
# Set up rgkern, lint it, and run the test suite. Extra arguments go to pytest (e.g. -x, -k name).
# Fails on a lint error (ruff, configured in pyproject.toml), when pytest fails, and when it
# collects no tests (pytest's exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
source scripts/setup.sh
"$PYTHON" -m ruff check rgkern kernels tests bench scripts
set +e
"$PYTHON" -m pytest tests/ -q "$@"
code=$?
if [ "$code" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$code"

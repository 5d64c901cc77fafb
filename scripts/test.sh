#!/usr/bin/env bash
# Sets up (scripts/setup.sh), checks formatting and lint, and runs the whole test suite.
# This is the command .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== clang-format"
find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | xargs -r "$VENV/bin/clang-format" --dry-run --Werror
echo "== pytest"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"

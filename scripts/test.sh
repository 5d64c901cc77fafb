#!/usr/bin/env bash
# Sets up (scripts/setup.sh), checks formatting and lint, runs the whole test suite, then the
# CPU kernels' tests under AddressSanitizer and UBSan (scripts/sanitize.sh; LOWPREC_SANITIZE=0
# skips that).
# This is the command .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
# In CI the CUDA sources must compile and link (there is no GPU to run them): a CUDA build
# failure fails the run instead of silently falling back to a CPU-only build.
if [ "${CI:-}" = true ]; then export LOWPREC_BUILD_CUDA=${LOWPREC_BUILD_CUDA:-1}; fi
bash scripts/setup.sh
VENV=${VENV:-.venv}
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== clang-format"
find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | xargs -r "$VENV/bin/clang-format" --dry-run --Werror
echo "== pytest"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
if [ "${LOWPREC_SANITIZE:-1}" != 0 ]; then
  bash scripts/sanitize.sh
fi

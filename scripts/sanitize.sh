#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds a copy of the
# working tree's tracked files (the development build stays as it is) with both sanitizers,
# then runs the kernel and module tests on each CPU path (AVX-512, AVX2, scalar). Any report
# fails the run: ASan stops at its first error, UBSan is built not to recover. AVX-512 and
# AVX2 masked loads and stores are not instrumented; the scalar path covers their tails'
# logic. Needs the venv of scripts/setup.sh. About ten minutes on two cores (xdist
# workers were slower under ASan); scripts/test.sh runs it last (LOWPREC_SANITIZE=0 skips it).
#
#   bash scripts/sanitize.sh [pytest arguments, default: the files below]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(cd "${VENV:-.venv}" && pwd)/bin/python"
# Logs and reports of the last run stay here (the copy is removed).
logs="$PWD/build/sanitize"
rm -rf "$logs" && mkdir -p "$logs"
work=$(mktemp -d)
keep_logs() { cp "$work"/*.log "$work"/report.* "$logs"/ 2>/dev/null || true; rm -rf "$work"; }
trap keep_logs EXIT  # (under set -e a failing cp in the trap would turn a pass into exit 1)
# The working tree's tracked files that exist (a tracked file deleted here is skipped).
git ls-files -z | xargs -0 -I{} sh -c '[ -e "$1" ] && cp --parents "$1" "$2" || true' _ {} "$work"
cd "$work"

echo "== sanitize: building the CPU extension with -fsanitize=address,undefined"
start=$(date +%s)
LOWPREC_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  LOWPREC_EXTRA_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
  LOWPREC_EXTRA_LDFLAGS="-fsanitize=address,undefined" \
  "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || { tail -n 40 build.log; exit 1; }
echo "   built in $(($(date +%s) - start)) s"

libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
[ -f "$libasan" ] && [ -f "$libubsan" ] ||
  { echo "sanitize: gcc's libasan / libubsan not found (install gcc's sanitizer runtimes)"; exit 1; }
export LD_PRELOAD="$libasan:$libubsan"
# Reports to files: pytest captures file descriptor 2, and a report written there dies with
# the process that ASan stops.
export ASAN_OPTIONS="detect_leaks=0:log_path=$work/report"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$work/report"
# The copy's own _C, not the editable install's (which supplies one where a tree has none).
"$PY" -c "import lowprec_kernels._C as c, sys; sys.exit(not c.__file__.startswith('$work/'))" ||
  { echo "sanitize: the copy's sanitized _C did not load (build.log in $logs)"; exit 1; }
# The CPU paths this machine has (a forced path it lacks would silently run another).
isas=$("$PY" -c "import lowprec_kernels as l; print(*l.build_info()['cpu_isa_supported'])")
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_blockwise.py tests/test_fourbit_kernels.py
  tests/test_int8_kernels.py tests/test_adam8bit_kernels.py tests/test_linear4bit.py
  tests/test_linear8bit.py tests/test_optim.py -k "not compile")
for isa in $isas; do
  echo "== sanitize: LOWPREC_CPU_ISA=$isa"
  rc=0
  LOWPREC_CPU_ISA=$isa LOWPREC_TEST_DEVICE=cpu "$PY" -m pytest -q -p no:cacheprovider \
    "${tests[@]}" >"pytest-$isa.log" 2>&1 || rc=$?
  tail -n 2 "pytest-$isa.log"
  if [ $rc != 0 ] || compgen -G "$work/report.*" >/dev/null; then
    { cat "$work"/report.* 2>/dev/null || true; } | head -n 60
    grep -E "^(FAILED|ERROR)" "pytest-$isa.log" | head -n 20 || true
    echo "sanitize: FAILED on $isa (pytest rc=$rc; logs in $logs)"
    exit 1
  fi
done
echo "== sanitize: clean"

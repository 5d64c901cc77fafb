#!/usr/bin/env bash
# The GPU check (ARCHITECTURE.md §7): build for the local GPU, run the whole test suite on
# cuda (cuda and triton backends), compute-sanitizer over a quick pass of every CUDA kernel,
# then the benchmark suite. Everything lands in one folder: $1, else $OUT (the device
# tool's output folder), else benchmarks/results/gpu-<date>. Budget: under 10 minutes.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}}
mkdir -p "$out"
PY=${PYTHON:-python3}
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$out/summary.txt"; }
record() { # record NAME RC
  echo "   $1: $([ "$2" = 0 ] && echo ok || echo "FAILED (rc=$2)")" | tee -a "$out/summary.txt"
  [ "$2" = 0 ] || status=1
}

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -n2
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step "build for the local arch"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} LOWPREC_BUILD_CUDA=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
MAX_JOBS=$(nproc) timeout 300 "$PY" setup.py build_ext --inplace >"$out/build.log" 2>&1
rc=$?; record "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" $rc
[ $rc = 0 ] || { tail -n 40 "$out/build.log"; exit 1; }
"$PY" -c "import json, lowprec_kernels as l; print(json.dumps(l.build_info(), indent=1, default=str))" \
  >"$out/build_info.json" 2>&1

step "tests on cuda (cuda + triton + reference backends)"
LOWPREC_TEST_DEVICE=cuda timeout 300 "$PY" -m pytest -q -p no:cacheprovider -x --timeout=120 \
  --junitxml="$out/pytest-cuda.xml" tests >"$out/pytest-cuda.log" 2>&1
rc=$?; record "pytest cuda" $rc; tail -n 15 "$out/pytest-cuda.log"

step "compute-sanitizer (memcheck) on the quick kernel pass"
if command -v compute-sanitizer >/dev/null; then
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" benchmarks/cuda_quick.py \
    >"$out/sanitizer-memcheck.log" 2>&1
  rc=$?; record "compute-sanitizer memcheck" $rc; tail -n 5 "$out/sanitizer-memcheck.log"
else
  echo "   compute-sanitizer not found" | tee -a "$out/summary.txt"; status=1
fi

step "benchmarks (quick)"
timeout 240 "$PY" -m lowprec_kernels.bench all --device cuda --quick --json "$out/bench-cuda.json" \
  >"$out/bench-cuda.txt" 2>&1
rc=$?; record "bench" $rc; cat "$out/bench-cuda.txt" | tail -n 60

step "done: status $status"
exit $status

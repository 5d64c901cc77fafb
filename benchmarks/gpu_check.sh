#!/usr/bin/env bash
# The GPU check (ARCHITECTURE.md §7): build for the local GPU, run the whole test suite on
# cuda (cuda and triton backends), compute-sanitizer over a quick pass of every CUDA kernel,
# then the benchmark suite. Everything lands in one folder: $1, else $OUT (the device
# tool's output folder), else benchmarks/results/gpu-<date>. Budget: the steps' time limits
# add up to 580 s (the device tool allows 600 s a command); the run of 2026-11-28 took 261 s
# on one H200 with 16 host cores. A failing step does not stop the later ones, so one run
# reports as much as it can.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
#
# The folder holds 8 files (the device tool brings back at most 8): summary.txt,
# machine.txt, build.log, pytest-cuda.log, sanitizer-memcheck.log, nf4-gemv-check.txt,
# bench-cuda.txt and bench-cuda.json.
set -uo pipefail
# A relative OUTPUT_DIR is the caller's, so it is resolved before the cd to the repository.
out=${1:+$(realpath -m -- "$1")}
cd "$(dirname "$0")/.."
out=${out:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}}
mkdir -p "$out"
# The Python with torch: $PYTHON, else the repository's .venv (scripts/setup.sh), else python3.
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
: >"$out/summary.txt"  # a rerun into the same folder starts its summary afresh
step() { echo "== $1 (at $(($(date +%s) - t0)) s)" | tee -a "$out/summary.txt"; }
record() { # record NAME RC
  echo "   $1: $([ "$2" = 0 ] && echo ok || echo "FAILED (rc=$2)")" | tee -a "$out/summary.txt"
  [ "$2" = 0 ] || status=1
}

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -n2
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo)"; } >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step "build for the local arch"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} LOWPREC_BUILD_CUDA=1
# CUDA_HOME as given, else setup.py finds the toolkit from nvcc on PATH (through wrapper
# scripts, whose own folder is not a toolkit root).
MAX_JOBS=$(nproc) timeout 120 "$PY" setup.py build_ext --inplace >"$out/build.log" 2>&1
rc=$?; record "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" $rc
[ $rc = 0 ] || { tail -n 40 "$out/build.log"; exit 1; }
"$PY" -c "import json, lowprec_kernels as l; print(json.dumps(l.build_info(), indent=1, default=str))" \
  >>"$out/machine.txt" 2>&1
# The first H200 run crashed (SIGSEGV inside ostream << long) when a CPU binding formatted its
# error message, under that machine's compiler (/opt/gcc, gcc 13.3) only. Record which C++
# compiler and runtime the build used, and whether that error path works, to find the cause.
{ echo "== C++ toolchain of the build"
  echo "CXX=${CXX:-unset} CC=${CC:-unset}; g++ on PATH: $(command -v g++)"
  g++ --version | head -n1
  echo "libstdc++ the extension loads:"; ldd lowprec_kernels/_C*.so | grep -E "stdc\+\+|libgcc_s"
  echo "libstdc++ symbols defined in the extension: $(nm -C --defined-only lowprec_kernels/_C*.so | grep -cE ' std::(basic_ostream|locale|ios_base)')"
  "$PY" -c "import torch; from lowprec_kernels import _C; x = torch.zeros(3); _C.quantize_blockwise_cpu(x, torch.zeros(256), 64, torch.zeros(2, dtype=torch.uint8), torch.zeros(1))" 2>&1 | tail -n1
  echo "binding error path exit status: ${PIPESTATUS[0]} (1: a Python exception, as expected; 139: SIGSEGV)"
} >>"$out/machine.txt" 2>&1

step "tests on cuda (cuda + triton + reference backends)"
# Worker processes share the GPU; each keeps its CPU threads few so 16 cores are not
# oversubscribed. Triton's compile cache is shared between them.
workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n "$(($(nproc) > 12 ? 12 : $(nproc)))")
# 2026-11-28: 3022 tests in 190 s; 3451 now.
OMP_NUM_THREADS=2 LOWPREC_TEST_DEVICE=cuda timeout 270 "$PY" -m pytest -q -p no:cacheprovider \
  "${workers[@]}" --timeout=120 --tb=short -rfE tests >"$out/pytest-cuda.log" 2>&1
rc=$?; record "pytest cuda" $rc; grep -E "^(FAILED|ERROR)" "$out/pytest-cuda.log" | head -n 40
tail -n 3 "$out/pytest-cuda.log"

step "compute-sanitizer (memcheck) on the quick kernel pass"
if command -v compute-sanitizer >/dev/null; then
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" benchmarks/cuda_quick.py \
    >"$out/sanitizer-memcheck.log" 2>&1
  rc=$?; record "compute-sanitizer memcheck" $rc; tail -n 25 "$out/sanitizer-memcheck.log"
else
  echo "   compute-sanitizer not found" | tee -a "$out/summary.txt"; status=1
fi

step "NF4 GEMV check (correctness + device time against F.linear)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 50 "$PY" benchmarks/cuda_gemv_check.py \
  >"$out/nf4-gemv-check.txt" 2>&1
rc=$?; record "nf4 gemv check" $rc; tail -n 20 "$out/nf4-gemv-check.txt"

step "benchmarks (quick)"
timeout 80 "$PY" -m lowprec_kernels.bench all --device cuda --quick --json "$out/bench-cuda.json" \
  >"$out/bench-cuda.txt" 2>&1
rc=$?; record "bench" $rc; tail -n 80 "$out/bench-cuda.txt"

step "done: status $status"
exit $status

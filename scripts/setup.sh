#!/usr/bin/env bash
# Makes a fresh machine ready: a venv in .venv with requirements-dev.txt, and the _C
# extension built in place (CPU always; CUDA too when torch has CUDA and nvcc is found).
# Reruns are cheap: pip runs only when requirements-dev.txt changed, and ninja rebuilds
# only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp_of() { sha256sum "$@" | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
req_stamp=$(stamp_of requirements-dev.txt)
if [ "$(cat "$VENV/.requirements-stamp" 2>/dev/null)" != "$req_stamp" ]; then
  echo "setup: installing requirements-dev.txt (torch 2.14.1, the CUDA build: several GB unless pip finds it locally)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$req_stamp" >"$VENV/.requirements-stamp"
fi

# setup.py finds the CUDA toolkit itself (CUDA_HOME, else the nvcc on PATH, through wrappers).
# The extension is rebuilt when its sources, the build settings or torch change (an extension
# built against another torch may not load, or load and misbehave; the package only warns).
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
# Everything setup.py reads: the sources, its switches and flags, the compilers it finds.
settings="${LOWPREC_BUILD_CUDA:-auto}|${TORCH_CUDA_ARCH_LIST:-default}|${LOWPREC_EXTRA_CFLAGS:-}|${LOWPREC_EXTRA_LDFLAGS:-}|${CXX:-}|${CC:-}|${CUDA_HOME:-}|${CUDA_PATH:-}|$(command -v nvcc || true)|torch$torch_version"
src_stamp=$(stamp_of setup.py $(find csrc -type f | sort))-$(echo "$settings" | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.build-stamp" 2>/dev/null)" != "$src_stamp" ] || ! ls lowprec_kernels/_C*.so >/dev/null 2>&1; then
  echo "setup: building lowprec_kernels._C (LOWPREC_BUILD_CUDA=${LOWPREC_BUILD_CUDA:-auto})"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps -e .
  echo "setup: build took $(($(date +%s) - start)) s"
  echo "$src_stamp" >"$VENV/.build-stamp"
fi
# The package only warns when its extension does not load (a broken build, missing symbols):
# here that is a failure, as is a CUDA build whose backend does not load on a GPU.
"$VENV/bin/python" - <<'PY'
import sys

import torch

import lowprec_kernels as lpk

backends = lpk.available_backends()
print("setup: backends", backends)
info = lpk.build_info()
if not backends["cpu"]:
    sys.exit(f"setup: the cpu backend does not load: {info.get('error', info)}")
if info.get("cuda_compiled") and torch.cuda.is_available() and not backends["cuda"]:
    sys.exit(f"setup: the CUDA build's backend does not load: {info}")
PY

"""Builds the native extension ``lowprec_kernels._C`` (package metadata is in pyproject.toml).

Against the torch already installed (no second torch from build isolation)::

    pip install --no-build-isolation --no-deps -e .      # editable; _C*.so lands in lowprec_kernels/
    python setup.py build_ext --inplace                  # the same, without pip

CPU sources are always built. CUDA sources are built when ``LOWPREC_BUILD_CUDA`` allows it:

* ``auto`` (default): when torch is a CUDA build and a CUDA toolkit (nvcc) of the same major
  version is found; otherwise CPU only, with a note saying why;
* ``1``: CUDA required, the build fails with the reason if it is impossible;
* ``0``: CPU only.

The toolkit is ``CUDA_HOME`` (or ``CUDA_PATH``) when set, else the one the ``nvcc`` on PATH
belongs to, following symlinks and wrapper scripts that exec the real nvcc. GPU
architectures come from ``TORCH_CUDA_ARCH_LIST`` (see ``DEFAULT_CUDA_ARCH_LIST``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")  # relative: setuptools wants source paths relative to setup.py

# Used when TORCH_CUDA_ARCH_LIST is unset. Build machines (CI) have no GPU to ask, and each
# architecture adds a full device compile, so the default is small: sm_80 code (A100, and the
# rest of the 8.x family runs it) and sm_90 code (H100/H200) plus sm_90 PTX that newer GPUs
# JIT-compile. Set TORCH_CUDA_ARCH_LIST (e.g. "8.9") to build for another GPU.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# Host compiler flags. No -ffast-math and no FMA contraction anywhere: the kernels must
# reproduce the reference's IEEE float results bit for bit. No global -mavx2/-mavx512f: SIMD
# code is enabled per function (target attributes) and chosen at run time, so the .so runs on
# any x86-64. The C++ standard flag is left to torch (C++17 or C++20, as its headers need).
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fvisibility=hidden"]
# --fmad=false for the same reason as -ffp-contract=off: kernels that want an FMA call fmaf().
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]


def _note(msg: str) -> None:
    print(f"lowprec_kernels setup: {msg}", file=sys.stderr)


def _build_cuda_mode() -> str:
    mode = os.environ.get("LOWPREC_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LOWPREC_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _real_nvcc(path: str) -> Path:
    """The nvcc binary behind ``path``, following symlinks and exec-style wrapper scripts."""
    nvcc = Path(path).resolve()
    for _ in range(4):  # wrappers may wrap wrappers; stop at a binary
        try:
            head = nvcc.read_bytes()[:4096]
        except OSError:
            return nvcc
        if not head.startswith(b"#!"):
            return nvcc
        text = nvcc.read_text(errors="replace")
        targets = [
            Path(m).resolve()
            for m in re.findall(r"(/[^\s\"'`;|&]*/bin/nvcc)\b", text)
            if Path(m).is_file() and Path(m).resolve() != nvcc
        ]
        if not targets:
            return nvcc
        nvcc = targets[0]
    return nvcc


def _find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit root, how it was found) or (None, why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            if not (home / "bin" / "nvcc").is_file():
                return None, f"${var}={home} has no bin/nvcc"
            if not (home / "include" / "cuda_runtime.h").is_file():  # e.g. a wrapper's folder
                real = _real_nvcc(str(home / "bin" / "nvcc")).parent.parent
                return None, (
                    f"${var}={home} has no include/cuda_runtime.h (a toolkit root has; "
                    f"its bin/nvcc runs {real / 'bin' / 'nvcc'}: try {var}={real})"
                )
            return home, f"${var}"
    on_path = shutil.which("nvcc")
    if on_path is None:
        return None, "no nvcc on PATH and CUDA_HOME unset"
    nvcc = _real_nvcc(on_path)
    home = nvcc.parent.parent
    if not (home / "include" / "cuda_runtime.h").is_file():
        return None, f"nvcc at {nvcc} has no include/cuda_runtime.h beside it"
    return home, f"nvcc on PATH ({on_path} -> {nvcc})"


def _nvcc_version(home: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _cuda_plan(torch) -> tuple[Path | None, str]:
    """(CUDA_HOME to build with, or None for a CPU-only build; the reason)."""
    mode = _build_cuda_mode()
    if mode == "0":
        return None, "LOWPREC_BUILD_CUDA=0"
    problem = reason = None
    home = None
    if getattr(torch.version, "hip", None):
        problem = f"torch {torch.__version__} is a ROCm build (the CUDA sources are not hipified)"
    elif not torch.version.cuda:
        problem = f"torch {torch.__version__} is not a CUDA build"
    else:
        home, how = _find_cuda_home()
        if home is None:
            problem = how
        else:
            version = _nvcc_version(home)
            if version is None:
                problem = f"cannot run {home / 'bin' / 'nvcc'} --version"
            elif version.split(".")[0] != torch.version.cuda.split(".")[0]:
                problem = (
                    f"nvcc {version} ({home}) but torch was built with CUDA {torch.version.cuda}"
                )
            else:
                reason = f"CUDA {version} at {home}, found by {how}"
    if problem is not None:
        if mode == "1":
            raise SystemExit(
                f"LOWPREC_BUILD_CUDA=1 but the CUDA sources cannot be built: {problem}"
            )
        return None, problem
    return home, reason


def _compiler_is_clang() -> bool:
    """Whether the C++ compiler setuptools will run (``CXX``, else Python's) is clang."""
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        version = subprocess.run(
            [*cxx.split()[:1], "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in version


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob(pattern))


# Commands that compile the extension (the metadata and sdist steps do not).
BUILDING_COMMANDS = {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel"}


def _in_isolated_build_env(torch_file: str) -> bool:
    """Whether torch was imported from a build front end's isolated environment (pip's
    pip-build-env-*, build's build-env-*): a torch of its own choosing, not the user's."""
    return re.search(r"[/\\](pip-)?build-env-", torch_file) is not None


def _extensions_and_commands():
    try:
        import torch
    except ImportError as err:
        raise SystemExit(
            "lowprec_kernels builds against an installed torch: install torch first, then "
            "`pip install --no-build-isolation -e .`"
        ) from err
    if _in_isolated_build_env(torch.__file__) and BUILDING_COMMANDS & set(sys.argv[1:]):
        # The extension would be built against the isolated env's torch (fetched for the
        # build, often another version or a CUDA build) and fail to load against the user's:
        # pip would report success and every op run on the slow reference backend.
        raise SystemExit(
            f"lowprec_kernels setup: building against torch {torch.__version__} from an "
            f"isolated build environment ({torch.__file__}), not the installed torch. Install "
            "with build isolation off: `pip install --no-build-isolation <this source>` "
            "(editable: `pip install --no-build-isolation -e .`)."
        )

    cuda_home, reason = _cuda_plan(torch)
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when first imported, and its own guess
        # (the parent of the directory holding `nvcc`) is wrong for a wrapper script.
        os.environ["CUDA_HOME"] = str(cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        _note(
            f"building CUDA kernels: {reason}; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
    else:
        _note(f"building CPU kernels only: {reason}")

    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = str(cuda_home)  # in case it was imported before us

    sources = _sources("module.cpp") + _sources("cpu/*.cpp")
    cxx_flags = list(CXX_FLAGS)
    nvcc_flags = list(NVCC_FLAGS)
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for expands to `#pragma omp parallel` in an OpenMP build of torch; the
        # libgomp it links resolves to the copy torch has already loaded. clang's -fopenmp
        # means LLVM's libomp, a second runtime beside torch's that ignores
        # torch.set_num_threads: clang is told to use libgomp too.
        openmp = "-fopenmp=libgomp" if _compiler_is_clang() else "-fopenmp"
        cxx_flags.append(openmp)
        link_flags.append(openmp)
    cxx_flags.append(f'-DLOWPREC_TORCH_VERSION="{torch.__version__}"')
    # Extra host compiler and linker flags, e.g. sanitizers (scripts/sanitize.sh).
    cxx_flags += os.environ.get("LOWPREC_EXTRA_CFLAGS", "").split()
    link_flags += os.environ.get("LOWPREC_EXTRA_LDFLAGS", "").split()

    common = {
        "name": "lowprec_kernels._C",
        "include_dirs": [str(ROOT / CSRC / "include")],
        "extra_link_args": link_flags,
    }
    if cuda_home is not None:
        sources += _sources("cuda/*.cpp") + _sources("cuda/*.cu")
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        cxx_flags += ["-DLOWPREC_WITH_CUDA", f'-DLOWPREC_CUDA_ARCH_LIST="{arch_list}"']
        nvcc_flags += ["-DLOWPREC_WITH_CUDA"]
        extension = cpp_extension.CUDAExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common
        )
    else:
        extension = cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags}, **common
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

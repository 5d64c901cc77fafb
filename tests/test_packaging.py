"""Packaging: the source distribution holds what a build needs, and the C++ CPU sources
compile for a target without x86 SIMD (aarch64: Apple silicon, Graviton), whose only paths
are the scalar ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("compares the sdist with the git checkout's files")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout.split()


def test_sdist_holds_every_tracked_source_and_nothing_built(tmp_path):
    """The sdist once held the .cpp files but no header: installing it failed to compile."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path), "sdist",
                    "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "LOWPREC_BUILD_CUDA": "0"}, timeout=300)  # fmt: skip
    (tarball,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    wanted = {f for f in _tracked_files() if not f.startswith("benchmarks/results/")}
    assert sorted(wanted - names) == []
    assert [n for n in names if n.endswith((".so", ".o", ".pyc"))] == []
    with tarfile.open(tarball) as tar:
        (info,) = [m for m in tar.getmembers() if m.name.count("/") == 1 and
                   m.name.endswith("/PKG-INFO")]  # fmt: skip
        metadata = tar.extractfile(info).read().decode()
    import lowprec_kernels

    assert f"\nVersion: {lowprec_kernels.__version__}\n" in metadata  # written in one place


def test_setup_refuses_to_build_against_an_isolated_build_envs_torch(tmp_path):
    """pip's default build isolation fetches a torch of its own: an extension built against it
    fails to load against the user's torch while pip reports success, so setup.py refuses."""
    fake = tmp_path / "pip-build-env-abc" / "overlay" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.99.0"\n')
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(fake.parent)})  # fmt: skip
    assert done.returncode != 0
    assert "isolated build environment" in done.stderr
    assert "--no-build-isolation" in done.stderr


def test_import_warns_when_the_extension_was_built_for_another_torch():
    """A build for another torch minor version (a wheel pip cached for it, say) may load and
    still misbehave: the import says so."""
    code = ("import warnings, torch; torch.__version__ = '2.99.0'; "
            "warnings.simplefilter('always'); "
            "import lowprec_kernels as lpk; print(lpk.available_backends()['cpu'])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True", "the extension loads, with a warning"
    assert "was built against torch" in done.stderr and "this is torch 2.99.0" in done.stderr


def _compiler_without_x86_simd() -> tuple[str, list[str]]:
    """A cross compiler for aarch64 where one is installed; else the host compiler with
    LOWPREC_FORCE_NO_SIMD, which builds the sources as a non-x86 target sees them."""
    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross:
        return cross, []
    return os.environ.get("CXX", "g++"), ["-DLOWPREC_FORCE_NO_SIMD"]


def test_cpu_sources_compile_without_x86_simd():
    """fourbit_gemv.cpp used an AVX-512 constant outside its x86 guard: nothing built on
    aarch64."""
    compiler, flags = _compiler_without_x86_simd()
    includes = [ROOT / "csrc" / "include", ROOT / "csrc", sysconfig.get_paths()["include"]]
    includes += cpp_extension.include_paths()
    command = [compiler, "-std=c++20", "-fsyntax-only", *flags, *(f"-I{p}" for p in includes)]
    sources = [ROOT / "csrc" / "module.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    running = [(s, subprocess.Popen([*command, str(s)], stderr=subprocess.PIPE, text=True))
               for s in sources]  # fmt: skip
    failed = {s.name: p.communicate(timeout=600)[1] for s, p in running if p.wait() != 0}
    assert failed == {}

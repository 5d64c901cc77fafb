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

"""Packaging: the source distribution holds what a build needs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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

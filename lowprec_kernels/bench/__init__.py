"""Microbenchmarks: ``python -m lowprec_kernels.bench [suite] [--device] [--quick] ...``.

A suite is a module of this package with ``rows(bench) -> list[Row]`` (see ``harness``).
Adding one is writing that module and listing its name in ``SUITES``; a listed suite whose
module does not exist yet is reported as not implemented rather than failing the run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Run order of ``all``.
SUITES = ("blockwise", "int8", "nf4", "adam")


def load_suite(name: str) -> ModuleType | None:
    """The suite's module, or None when it is not written yet."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {SUITES} or 'all'")
    module = f"{__name__}.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:  # the suite itself is missing, not something it imports
            return None
        raise

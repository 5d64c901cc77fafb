"""lowprec_kernels: fused low-precision kernels for PyTorch (LLM.int8, NF4/FP4, 8-bit Adam).

Every capability is a ``torch.ops.lowprec`` op with a pure-PyTorch ``reference`` kernel and,
where built and present, ``cpu`` (C++), ``cuda`` (CUDA C++) and ``triton`` kernels.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from lowprec_kernels import _dispatch, _ops, reference  # noqa: F401 - define the ops, register references
from lowprec_kernels._dispatch import available_backends, use_backend
from lowprec_kernels.quant_state import QuantState

__version__ = "0.1.0"

_REBUILD_HINT = (
    "Build it with `bash scripts/setup.sh` in a source checkout, or reinstall with "
    "`pip install --no-build-isolation <source>`."
)

try:
    _C = importlib.import_module("lowprec_kernels._C")
except ImportError as _err:  # the package still works on the reference backend
    _C = None
    _C_IMPORT_ERROR: str | None = str(_err)
    # Said once, at import: every op then runs on the pure-PyTorch reference, 15-70x slower
    # on the CPU, which would otherwise show only in build_info().
    warnings.warn(
        f"lowprec_kernels: the native extension did not load ({_err}); every op runs on the "
        f"slow reference backend (and Triton where present). {_REBUILD_HINT}",
        stacklevel=2,
    )
else:
    _C_IMPORT_ERROR = None
    _BUILT_FOR = _C.build_info().get("torch_version", "")
    if _BUILT_FOR.split(".")[:2] != torch.__version__.split(".")[:2]:
        # torch's C++ interface changes between minor versions: such a build may load and
        # still crash or misbehave (a wheel cached by pip for another torch, say).
        warnings.warn(
            f"lowprec_kernels: the native extension was built against torch {_BUILT_FOR}, "
            f"this is torch {torch.__version__}. {_REBUILD_HINT}",
            stacklevel=2,
        )


def _load_backend(module: str) -> None:
    try:
        importlib.import_module(f"lowprec_kernels.backends.{module}")
    except ImportError as err:
        warnings.warn(f"lowprec_kernels: backend {module!r} not loaded: {err}", stacklevel=2)


if _C is not None:
    _ops.use_native_state_check(_C.dispatcher_has_work)
    _load_backend("cpu")
    _load_backend("cuda")
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    _load_backend("triton")

from lowprec_kernels import functional, nn, optim  # noqa: E402, F401 - lpk.nn, lpk.optim


def build_info() -> dict:
    """What was compiled into ``_C`` (CPU ISA paths, CUDA archs, constants) and what is usable."""
    info = (
        dict(_C.build_info()) if _C is not None else {"compiled": False, "error": _C_IMPORT_ERROR}
    )
    info["available_backends"] = available_backends()
    info["eager_entries"] = _dispatch._EAGER_ENABLED  # LOWPREC_EAGER
    return info


__all__ = [
    "QuantState",
    "available_backends",
    "build_info",
    "functional",
    "nn",
    "optim",
    "use_backend",
]

"""Test harness: devices, backends, poisoned outputs, the Triton interpreter.

``LOWPREC_TEST_DEVICE`` (``cpu``, ``cuda`` or ``all``; default: every device present) picks
where kernels are tested; ``benchmarks/gpu_check.sh`` runs with ``cuda``. Without a GPU the
Triton kernels run on CPU tensors under the interpreter, which must be switched on before
triton is first imported: this file does it before importing the package.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lowprec_kernels as lpk  # noqa: E402
from lowprec_kernels._alloc import poisoned  # noqa: E402

# Native backends per device; "reference" is always tested too.
_BACKENDS_FOR_DEVICE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}


def devices_under_test() -> list[str]:
    wanted = os.environ.get("LOWPREC_TEST_DEVICE", "all")
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return present if wanted == "all" else [d for d in present if d == wanted]


def _triton_runs_on(device: str) -> bool:
    if device == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_params(include_reference: bool = False) -> list:
    """(device, backend) pairs that can run here, as pytest params with readable ids."""
    available = lpk.available_backends()
    params = []
    for device in devices_under_test():
        names = (("reference",) if include_reference else ()) + _BACKENDS_FOR_DEVICE[device]
        for name in names:
            ok = available[name] and (name != "triton" or _triton_runs_on(device))
            marks = () if ok else pytest.mark.skip(reason=f"backend {name} not available")
            params.append(pytest.param((device, name), id=f"{device}-{name}", marks=marks))
    return params


@pytest.fixture(params=backend_params())
def device_backend(request):
    """Each native backend on each device; the test compares it against ``reference``."""
    return request.param


@pytest.fixture(params=devices_under_test())
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output starts as poison, so an unwritten element fails the test."""
    with poisoned():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_on(backend: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``backend`` forced."""
    with lpk.use_backend(backend):
        return fn(*args, **kwargs)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a wider tensor)."""
    wide = torch.empty((*t.shape[:-1], t.shape[-1] * 2), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    return view

"""Output allocation for backend kernels, with a poison mode for tests.

Kernels allocate their outputs here instead of calling ``torch.empty`` directly. Tests turn
poisoning on so that every fresh output starts filled with a value no correct kernel
writes (NaN for floats, all bits set for integers): an element a kernel forgets to write
then fails the comparison with the reference instead of passing by luck.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_POISON = False


def _poison_value(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    if dtype == torch.uint8:
        return 0xFF
    return torch.iinfo(dtype).min  # int8: -128, never a valid LLM.int8 code (range ±127)


def poison(dtype: torch.dtype) -> float | int | bool | None:
    """The value fresh outputs of ``dtype`` start as, or None while poisoning is off: for
    kernels that allocate their outputs natively."""
    return _poison_value(dtype) if _POISON else None


def empty(shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` that fills the tensor with poison while poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(_poison_value(dtype))
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype or t.dtype, t.device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Within this block every kernel output starts as poison."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous

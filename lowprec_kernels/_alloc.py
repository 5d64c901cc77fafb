"""Output allocation for backend kernels, with a poison mode for tests.

Kernels allocate their outputs here instead of calling ``torch.empty`` directly. Tests turn
poisoning on so that every fresh output starts filled with a value no correct kernel
writes (NaN for floats, all bits set for integers): an element a kernel forgets to write
then fails the comparison with the reference instead of passing by luck. While poisoning is
on, each output is also followed in memory by a guard band holding a pattern, checked when
the ``poisoned()`` block ends: a kernel that writes past its output's end fails as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_POISON = False
# Elements after each poisoned output: more than the widest tile a kernel stores at once (a
# Triton block), so a store masked one tile too far lands in the band.
GUARD_ELEMENTS = 4096
# The poisoned outputs' whole buffers and their outputs' sizes, until their block ends.
_guarded: list[tuple[torch.Tensor, int]] = []
_guard_patterns: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


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


def _guard_pattern(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Small integers (exact in every dtype, never NaN): nothing a stray store writes alike."""
    key = (dtype, device)
    if key not in _guard_patterns:
        values = torch.arange(GUARD_ELEMENTS, device=device) % 97 + 3
        _guard_patterns[key] = values % 2 == 1 if dtype == torch.bool else values.to(dtype)
    return _guard_patterns[key]


def empty(shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` that fills the tensor with poison, and puts a guard band after it,
    while poisoning is on."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    size = torch.Size([shape] if isinstance(shape, int) else shape)
    n = size.numel()
    buffer = torch.empty(n + GUARD_ELEMENTS, dtype=dtype, device=device)
    buffer[:n].fill_(_poison_value(dtype))
    buffer[n:] = _guard_pattern(dtype, buffer.device)
    _guarded.append((buffer, n))
    # A tensor of its own on the buffer's memory (a slice would be a view, which outputs of
    # custom ops must not be).
    return torch.empty(0, dtype=dtype, device=buffer.device).set_(buffer.untyped_storage(), 0, size)


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype or t.dtype, t.device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Within this block every kernel output starts as poison."""
    global _POISON
    previous, _POISON = _POISON, True
    first = len(_guarded)
    try:
        yield
        overrun = [
            (tuple(buffer.shape), buffer.dtype)
            for buffer, n in _guarded[first:]
            if not torch.equal(buffer[n:], _guard_pattern(buffer.dtype, buffer.device))
        ]
        if overrun:
            raise AssertionError(
                f"{len(overrun)} kernel output(s) written past their end, e.g. the buffer "
                f"(output + {GUARD_ELEMENTS} guard elements) of shape and dtype {overrun[0]}"
            )
    finally:
        _POISON = previous
        del _guarded[first:]

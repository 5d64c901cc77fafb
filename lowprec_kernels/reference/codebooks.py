"""The codebooks of every format and the one encoding rule they all share.

These tables are the single source of truth: the C++, CUDA and Triton kernels receive them
as tensors and never hold a copy. Their SHA-256 hashes are pinned in the tests
(ARCHITECTURE.md §4).
"""

from __future__ import annotations

import functools

import torch

from lowprec_kernels._tables import caching_allowed

# 4-bit NormalFloat (QLoRA), index 0..15.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# e2m1 FP4 scaled so the largest magnitude is 1 (bitsandbytes' layout): bit 3 is the sign.
# Index 8 ("negative zero") holds +0.0, as in bitsandbytes' table (written there as the
# integer -0); the pinned SHA-256 depends on that bit pattern.
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)
FP4_VALUES = _FP4_MAGNITUDES + (0.0,) + tuple(-v for v in _FP4_MAGNITUDES[1:])
FP4_SIGN_BIT = 0b1000

QUANT_TYPES_4BIT = ("nf4", "fp4")


def _dynamic_map_values(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> list:
    """bitsandbytes' ``create_dynamic_map``: a sign, a decimal exponent, a linear fraction.

    The arithmetic (float32 linspace and means, scaled by a Python float) is kept exactly as
    bitsandbytes does it, so the table matches theirs bit for bit.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        shift = 0 if signed else 1
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits + shift) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32, device="cpu")
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return sorted(data)


# Both maps as Python floats (float32 values), computed once at import: a literal, which
# torch.compile and fake-tensor tracing turn into a tensor as they do any other, where building
# the map (torch ops and .tolist()) cannot be traced.
_DYNAMIC_MAP_VALUES = {signed: tuple(_dynamic_map_values(signed)) for signed in (True, False)}


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    return torch.tensor(_DYNAMIC_MAP_VALUES[signed], dtype=torch.float32, device="cpu")


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """The 8-bit dynamic map, float32[256] sorted ascending (a fresh tensor each call), on
    ``device`` (default: torch's default device, as a factory function's)."""
    if device is None:
        device = torch.get_default_device()
    if caching_allowed():  # a copy of a cached one: 4x faster than building it
        return _dynamic_map_cpu(bool(signed)).to(device=device, copy=True)
    return torch.tensor(_DYNAMIC_MAP_VALUES[bool(signed)], dtype=torch.float32, device=device)


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry codebook of ``quant_type`` ("nf4" or "fp4"), indexed by the 4-bit code."""
    if quant_type == "nf4":
        return nf4_code(device)
    if quant_type == "fp4":
        return fp4_code(device)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")


def encode_thresholds(code: torch.Tensor) -> torch.Tensor:
    """Decision thresholds of a sorted codebook, padded with +inf to ``code.numel()``.

    ``t[i]`` is the largest float32 not above the exact midpoint of ``code[i]`` and
    ``code[i+1]`` (the midpoint of two float32 values is exact in float64). For a float32
    ``v``, ``v > t[i]`` then holds exactly when ``v`` lies strictly above the midpoint, so
    counting the thresholds below ``v`` gives the nearest entry with ties to the lower index.
    Every backend encodes with these thresholds, so every backend agrees bit for bit.
    """
    c = code.to(torch.float64)
    mid = (c[:-1] + c[1:]) / 2
    t = mid.to(torch.float32)
    t = torch.where(t.to(torch.float64) > mid, torch.nextafter(t, t.new_tensor(-torch.inf)), t)
    return torch.cat([t, t.new_full((1,), torch.inf)])


def encode_nearest(v: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for each float32 ``v`` (ties low, NaN -> 0), int64."""
    # searchsorted(right=False) counts thresholds strictly below v; NaN compares false.
    idx = torch.searchsorted(thresholds[:-1].contiguous(), v.contiguous(), right=False)
    return torch.where(torch.isnan(v), torch.zeros_like(idx), idx)

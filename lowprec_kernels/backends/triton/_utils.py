"""Helpers shared by the Triton kernel families: interpreter detection, launch heuristics,
device selection and the cached encode thresholds of a codebook."""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
import triton
import triton.language as tl

from lowprec_kernels._tables import device_key
from lowprec_kernels.reference.codebooks import encode_thresholds

# The Triton interpreter runs a kernel one program at a time in numpy, so it cannot tune:
# every launch configuration is chosen by heuristic, never by multi-config autotuning.

# Threads per warp on NVIDIA GPUs, which the heuristics size tiles for (an AMD wavefront is
# 64: the same num_warps then means twice the threads).
WARP_SIZE = 32
# Elements each thread should own in a memory-bound tile; more gives fewer, fatter
# programs, fewer gives more parallelism. 8 fp32 = two 128-bit accesses per thread.
ELEMENTS_PER_THREAD = 8
MAX_NUM_WARPS = 8


def interpreter_active() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_devices() -> tuple[str, ...]:
    """Device types the Triton kernels register for: CUDA, plus CPU under the interpreter."""
    return ("cuda", "cpu") if interpreter_active() else ("cuda",)


def num_warps_for(tile_elements: int) -> int:
    """Warps for a memory-bound tile of ``tile_elements``: about ELEMENTS_PER_THREAD each."""
    warps = tile_elements // (WARP_SIZE * ELEMENTS_PER_THREAD)
    return max(1, min(MAX_NUM_WARPS, triton.next_power_of_2(max(warps, 1))))


# The kernels offset a 2-D operand's rows in int64 but its columns as int32 index * stride.
# A column offset past int32 (a transposed view of a huge tensor: column stride in the
# millions) is taken from a contiguous copy instead. (A tile's masked lanes past the last
# column may wrap: their addresses are never read.)
_INT32_MAX = torch.iinfo(torch.int32).max


def int32_column_offsets(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` itself, or a contiguous copy where its column offsets overflow int32."""
    if t.shape[1] * abs(t.stride(1)) > _INT32_MAX:
        return t.contiguous()
    return t


def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls use TF32 (F.linear's choice), through either of
    torch's APIs: ``torch.get_float32_matmul_precision`` raises once the newer
    ``torch.backends.*.fp32_precision`` settings are used."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        precision = torch.backends.cuda.matmul.fp32_precision
        if precision == "none":
            precision = torch.backends.fp32_precision
        return precision == "tf32"


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device; make that the tensor's device."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# --- exact conversions to and from fp32 ----------------------------------------------------
# The interpreter converts bf16 <-> fp32 with its own bit routine, which truncates instead of
# rounding to nearest even and mangles subnormals. These helpers do the conversion with
# integer ops instead: the same bits as torch (and as the GPU's own cvt) on every target.

# The quiet NaN c10::BFloat16 writes (NaN bits are not pinned). A tl.constexpr: jit code
# compiled for a GPU may read no other kind of global.
BF16_CANONICAL_NAN = tl.constexpr(0x7FC0)


@triton.jit
def to_fp32(x):
    """``x`` widened to fp32 exactly (bf16: the 16 bits become the top half of the fp32)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def fp32_to_bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even, by bits (as torch's c10::BFloat16 does it)."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16  # a NaN payload could round to inf: fixed below
    rounded = tl.where(x != x, BF16_CANONICAL_NAN, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def fp32_to(x, dtype: tl.constexpr):
    """``x`` (fp32) rounded to nearest even in ``dtype``, identically on GPU and interpreter."""
    if dtype == tl.bfloat16:
        return fp32_to_bf16_rtne(x)
    else:
        return x.to(dtype)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped launch order: GROUP_M row tiles sweep the
    same column tile (the same weight columns) back to back, so the weight tile is reused
    from L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# --- encode thresholds ----------------------------------------------------------------------

# A sorted codebook of 256 entries becomes a 256-entry threshold table for the kernels'
# branch-free binary search. The table is computed once per (codebook tensor, version, stream)
# and reused, since callers (the 8-bit optimizers above all) pass the same map every step.
# Per stream (device_key): a table is read only on the stream it was made on, so that when a
# full cache is cleared its memory goes back to the allocator behind every kernel reading it.
_THRESHOLD_CACHE_SIZE = 16
_threshold_cache: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


def threshold_table(code: torch.Tensor) -> torch.Tensor:
    """``encode_thresholds(code)`` (float32[256], +inf padded) on code's device, cached.

    The table is the reference's, so every backend encodes with the same thresholds.
    """
    version = None if code.is_inference() else code._version  # inference tensors: no counter
    key = (id(code), device_key(code.device))
    cached = _threshold_cache.get(key)
    if version is not None and cached is not None:
        ref, cached_version, table = cached
        if ref() is code and cached_version == version:
            return table
    table = encode_thresholds(code).to(device=code.device, dtype=torch.float32).contiguous()
    if version is not None:
        if len(_threshold_cache) >= _THRESHOLD_CACHE_SIZE:
            _threshold_cache.clear()
        _threshold_cache[key] = (weakref.ref(code), version, table)
    return table

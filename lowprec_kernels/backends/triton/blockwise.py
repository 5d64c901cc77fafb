"""Blockwise 8-bit quantization with a 256-entry codebook (the dynamic map), in Triton.

Each program owns BLOCKS_PER_PROGRAM consecutive quantization blocks as one 2-D tile
``[BLOCKS_PER_PROGRAM, BLOCKSIZE]`` of the flattened tensor, so one row of the tile is one
block and its absmax is a row reduction. Small blocksizes get several blocks per program so
that every program moves a useful amount of memory.

Encoding is exactly nearest (ARCHITECTURE.md §4.1): ``v = x / absmax`` with IEEE-rounded
division, then the code index is the number of encode thresholds below v, found with an
8-step branch-free binary search over a 256-entry table gathered from global memory (it
stays in L1). Every backend uses the same thresholds, so all backends agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels._ops import CODEBOOK_SIZE_8BIT
from lowprec_kernels.backends.triton._utils import (
    device_guard,
    fp32_to,
    kernel_devices,
    num_warps_for,
    threshold_table,
    to_fp32,
)

# Elements per program tile: blocksizes below this get several blocks per program.
TILE_ELEMENTS = 2048
CODEBOOK_BITS = CODEBOOK_SIZE_8BIT.bit_length() - 1  # binary-search steps over the thresholds
# Blocks with absmax below TINY_ABSMAX are scaled by TINY_ABSMAX_SCALE before the division
# (see the kernel). Powers of two: the scaling is exact and cannot overflow.
TINY_ABSMAX = 2.0**-64
TINY_ABSMAX_SCALE = 2.0**64


def _launch_config(blocksize: int, n_blocks: int) -> tuple[int, int, int]:
    """(blocks per program, num_warps, grid size) for a blockwise launch."""
    blocks_per_program = max(1, TILE_ELEMENTS // blocksize)
    tile = blocks_per_program * blocksize
    return blocks_per_program, num_warps_for(tile), triton.cdiv(n_blocks, blocks_per_program)


# --- the encode rule as jit helpers: the blockwise kernel below and the fused 8-bit Adam step
# (which requantizes its updated states) both call them.


@triton.jit
def block_absmax(x):
    """Largest |x| of each row of a 2-D fp32 tile, NaN when the row holds a NaN.

    tl.max ignores NaN (maxnum on GPU, nanmax in the interpreter), but a NaN anywhere in a
    block must make its absmax NaN, so NaN is propagated by hand."""
    absmax = tl.max(tl.abs(x), axis=1)
    row_has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    return tl.where(row_has_nan, float("nan"), absmax)


@triton.jit
def nearest_codes(
    x,
    absmax,
    thresholds_ptr,
    CODEBOOK_BITS: tl.constexpr,
    TINY_ABSMAX: tl.constexpr,
    TINY_ABSMAX_SCALE: tl.constexpr,
):
    """int32 index of the codebook entry nearest to ``x / absmax`` for each row of a 2-D tile
    (``absmax`` one per row).

    An all-zero block divides by 1 instead, which gives v = 0 exactly as specified. div_rn:
    Triton's plain `/` on fp32 lowers to an approximate division on NVIDIA. div_rn may also
    lower to a flush-to-zero division (div.rn.ftz.f32), which would turn subnormal x or absmax
    into 0. Only blocks whose absmax is tiny can tell (elsewhere a subnormal x encodes as 0.0
    anyway), and those are scaled by an exact power of two first: both operands stay exact and
    the quotient, hence its rounding, is unchanged.

    index = #{i : v > t_i} over the sorted thresholds (ties go to the lower index, NaN compares
    false and encodes as 0). Step s probes t[index + s - 1]; the largest probe is t[254], so
    the +inf padding at t[255] is never read and index ends at most 255."""
    divisor = tl.where(absmax == 0.0, 1.0, absmax)
    scale = tl.where(divisor < TINY_ABSMAX, TINY_ABSMAX_SCALE, 1.0)
    v = tl.math.div_rn(x * scale[:, None], (divisor * scale)[:, None])
    index = tl.zeros(x.shape, dtype=tl.int32)
    for bit in tl.static_range(CODEBOOK_BITS - 1, -1, -1):
        step = 1 << bit
        threshold = tl.load(thresholds_ptr + index + (step - 1))
        index = tl.where(v > threshold, index + step, index)
    return index


@triton.jit
def _quantize_blockwise_kernel(
    a_ptr,
    thresholds_ptr,
    codes_ptr,
    absmax_ptr,
    n_elements,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    CODEBOOK_BITS: tl.constexpr,
    TINY_ABSMAX: tl.constexpr,
    TINY_ABSMAX_SCALE: tl.constexpr,
):
    # int64 offsets: tensors past 2**31 elements are ordinary for 8-bit optimizer states.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_bounds = offsets < n_elements
    x = to_fp32(tl.load(a_ptr + offsets, mask=in_bounds, other=0.0))

    absmax = block_absmax(x)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
    index = nearest_codes(x, absmax, thresholds_ptr, CODEBOOK_BITS, TINY_ABSMAX, TINY_ABSMAX_SCALE)
    tl.store(codes_ptr + offsets, index.to(tl.uint8), mask=in_bounds)


@triton.jit
def _dequantize_blockwise_kernel(
    codes_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n_elements,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offsets = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_bounds = offsets < n_elements
    codes = tl.load(codes_ptr + offsets, mask=in_bounds, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0.0)
    # One fp32 multiply (nothing to contract into an FMA), then one rounding to the output.
    out = tl.load(code_ptr + codes) * absmax[:, None]
    tl.store(out_ptr + offsets, fp32_to(out, out_ptr.dtype.element_ty), mask=in_bounds)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    a = A.contiguous().view(-1)
    n = a.numel()
    n_blocks = triton.cdiv(n, blocksize)
    codes = empty(A.shape, torch.uint8, A.device)
    absmax = empty((n_blocks,), torch.float32, A.device)
    thresholds = threshold_table(code)
    blocks_per_program, num_warps, grid = _launch_config(blocksize, n_blocks)
    with device_guard(A):
        _quantize_blockwise_kernel[(grid,)](
            a,
            thresholds,
            codes,
            absmax,
            n,
            n_blocks,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            CODEBOOK_BITS=CODEBOOK_BITS,
            TINY_ABSMAX=TINY_ABSMAX,
            TINY_ABSMAX_SCALE=TINY_ABSMAX_SCALE,
            num_warps=num_warps,
        )
    return codes, absmax


def dequantize_blockwise(
    A: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``A`` holds the uint8 codes (the op schema's name for them)."""
    c = A.contiguous().view(-1)
    n = c.numel()
    n_blocks = triton.cdiv(n, blocksize)
    out = empty(A.shape, dtype, A.device)
    blocks_per_program, num_warps, grid = _launch_config(blocksize, n_blocks)
    with device_guard(A):
        _dequantize_blockwise_kernel[(grid,)](
            c,
            absmax.contiguous(),
            code.contiguous(),
            out,
            n,
            n_blocks,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            num_warps=num_warps,
        )
    return out


for _device in kernel_devices():
    register_kernel("quantize_blockwise", backend="triton", device=_device)(quantize_blockwise)
    register_kernel("dequantize_blockwise", backend="triton", device=_device)(dequantize_blockwise)

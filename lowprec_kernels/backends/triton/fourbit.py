"""NF4 / FP4 in Triton: 4-bit quantize, dequantize and the fused dequant-matmul.

Layout and rules are the reference's (``reference/fourbit.py``, ARCHITECTURE.md §4): the
weight is flattened row-major, element ``2i`` sits in the high nibble of byte ``i`` and
``2i+1`` in the low one, one scale per block of ``blocksize`` elements, the scale optionally
double-quantized and decoded as ``nested_code[c] * nested_absmax[b // nested_blocksize] +
offset`` in fp32. Every kernel reads codes with ``_load_codes`` and block scales with
``_block_scales`` (the matmul kernels through ``_decode_weight``), launched with FMA
contraction off so the scale decode is the reference's mul-then-add bit for bit.

``matmul_4bit`` has two kernels, chosen by the number of rows M of x (all leading dims):

* M <= GEMV_MAX_M: a GEMV. One program per (row of x, tile of output features); it streams
  the packed weight once per row, decodes it in fp32 and reduces ``w * x`` over K in fp32.
  At these M the op is bound by reading the 4-bit weight, and repeated rows of a tile hit
  L2, so no tensor cores are needed.
* M > GEMV_MAX_M: a dequant-GEMM. Each program owns a [BLOCK_M, BLOCK_N] output tile; per
  K step it decodes a [BLOCK_K, BLOCK_N] weight tile to the dot dtype and accumulates
  ``tl.dot`` in fp32 (tensor cores on GPU), so the decode is amortized over BLOCK_M rows.

Tile sizes come from shape heuristics (``_gemv_config``, ``_gemm_config``), never from
multi-config autotuning: the interpreter cannot autotune, and one code path is tested.
Scales are gathered per element (blocks may cross rows when ``in % blocksize != 0``); on a
GPU those gathers hit L1, as do the 16-entry codebook lookups.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels._ops import CODEBOOK_SIZE_4BIT
from lowprec_kernels.backends.triton._utils import (
    device_guard,
    fp32_to,
    grouped_tile,
    int32_column_offsets,
    interpreter_active,
    kernel_devices,
    num_warps_for,
    tf32_allowed,
    to_fp32,
)
from lowprec_kernels.backends.triton.blockwise import TINY_ABSMAX, TINY_ABSMAX_SCALE
from lowprec_kernels.reference.codebooks import FP4_SIGN_BIT, code_4bit, encode_thresholds

SEARCH_STEPS = CODEBOOK_SIZE_4BIT.bit_length() - 1  # binary-search steps over 16 thresholds
# Elements per program of the quantize / dequantize tiles (several small blocks per program).
TILE_ELEMENTS = 2048
# TINY_ABSMAX / TINY_ABSMAX_SCALE: the blockwise kernel's guard, shared. Blocks with a tiny
# absmax are scaled by an exact power of two before the division, so a flush-to-zero division
# cannot change a code.

# --- matmul dispatch and tiles ----------------------------------------------------------------
GEMV_MAX_M = 4  # rows of x up to which the GEMV runs; above it the tensor-core GEMM
GEMV_MAX_BLOCK_K = 256
GEMV_TILE_ELEMENTS = 4096  # BLOCK_N * BLOCK_K of one GEMV step
GEMM_MIN_TILE = 16  # tl.dot needs every tile dimension >= 16
GEMM_MAX_BLOCK_M = 128
GEMM_BLOCK_N_SMALL_M = 64  # BLOCK_M <= 32: more programs along N instead
GEMM_BLOCK_N = 128
GEMM_BLOCK_K_16BIT = 64
GEMM_BLOCK_K_32BIT = 32  # fp32 operands: half the K step for the same register footprint
GEMM_GROUP_M = 8  # programs sharing a weight column tile run together (L2 reuse)
# Pipeline depth of the GEMM's K loop. Every stage holds the weight tile's gathered loads
# (packed bytes, codebook values, block scales) beside x's tile: 3 stages of the 16-bit
# 128 x 128 x 64 tile need 224 KiB (Triton 3.8) to 256 KiB (3.6) of shared memory, over
# an H100/H200's 227 KiB; 2 stages need 128 KiB (tests/test_triton_sm90.py checks).
GEMM_NUM_STAGES = 2
GEMM_WIDE_TILE = 128 * 128  # tiles of at least this many outputs get 8 warps, others 4

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --- the encode tables ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _encode_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds float32[16], code_of_index int32[16]) for the kernels' binary search.

    NF4 searches ``v`` over the thresholds of its sorted codebook and the index is the code.
    FP4 searches ``|v|`` over the thresholds of its 8 sorted magnitudes (padded with +inf, so
    the index stays below 8) and ``code_of_index`` maps the sorted position to the code; the
    kernel then sets the sign bit from x. Both are the reference's ``encode_4bit``.
    """
    code = code_4bit(quant_type, "cpu")
    if quant_type == "nf4":
        thresholds = encode_thresholds(code)
        code_of_index = torch.arange(CODEBOOK_SIZE_4BIT, device="cpu")
    else:
        magnitudes, order = code[:FP4_SIGN_BIT].sort()
        pad = CODEBOOK_SIZE_4BIT - FP4_SIGN_BIT
        thresholds = torch.cat(
            [encode_thresholds(magnitudes), torch.full((pad,), torch.inf, device="cpu")]
        )
        code_of_index = torch.cat([order, torch.zeros(pad, dtype=order.dtype, device="cpu")])
    return (
        thresholds.to(device=device, dtype=torch.float32).contiguous(),
        code_of_index.to(device=device, dtype=torch.int32).contiguous(),
    )


# --- shared jit helpers ----------------------------------------------------------------------


@triton.jit
def _encode(
    x,
    v,
    thresholds_ptr,
    code_of_index_ptr,
    SIGN_FROM_X: tl.constexpr,
    SIGN_BIT: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    """4-bit codes (int32) of unit-scaled ``v``; ``x`` (the unscaled value) gives FP4's sign."""
    if SIGN_FROM_X:
        v = tl.abs(v)
    # index = #{i : v > t_i} (ties go to the lower index; NaN compares false -> 0). The largest
    # probe is t[14]: the +inf padding at t[15] is never read.
    index = tl.zeros(v.shape, dtype=tl.int32)
    for bit in tl.static_range(SEARCH_STEPS - 1, -1, -1):
        step = 1 << bit
        threshold = tl.load(thresholds_ptr + index + (step - 1))
        index = tl.where(v > threshold, index + step, index)
    code = tl.load(code_of_index_ptr + index)
    if SIGN_FROM_X:
        code = tl.where(x < 0, code | SIGN_BIT, code)
    return code


@triton.jit
def _block_scales(
    blocks,
    mask,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """fp32 scale of each quantization block: absmax, or its double-quant decode."""
    if NESTED:
        c = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + c) * nested + offset
    else:
        scale = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return scale


@triton.jit
def _load_offset(offset_ptr, NESTED: tl.constexpr):
    if NESTED:
        offset = tl.load(offset_ptr)
    else:
        offset = 0.0
    return offset


@triton.jit
def _load_codes(w_ptr, elements, mask):
    """The 4-bit codes (int32) of the elements at flat indices ``elements``: element ``2i`` is
    the high nibble of byte ``i``, ``2i+1`` the low one. Masked-off elements read code 0."""
    packed = tl.load(w_ptr + elements // 2, mask=mask, other=0)
    return tl.where(elements % 2 == 0, packed >> 4, packed & 0xF).to(tl.int32)


@triton.jit
def _decode_weight(
    elements,
    mask,
    w_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """fp32 values of the weight elements at flat indices ``elements`` (int64).

    Masked-off elements decode to finite values (code 0 times a finite scale); callers
    multiply them by zeros of x or never store them.
    """
    codes = _load_codes(w_ptr, elements, mask)
    scale = _block_scales(
        elements // BLOCKSIZE,
        mask,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset,
        NESTED,
        NESTED_BLOCKSIZE,
    )
    return tl.load(code_ptr + codes) * scale


# --- quantize ---------------------------------------------------------------------------------


@triton.jit
def _quantize_4bit_kernel(
    a_ptr,
    thresholds_ptr,
    code_of_index_ptr,
    packed_ptr,
    absmax_ptr,
    n_elements,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    SIGN_FROM_X: tl.constexpr,
    SIGN_BIT: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    TINY_ABSMAX: tl.constexpr,
    TINY_ABSMAX_SCALE: tl.constexpr,
):
    # One tile row per block, one column per output byte: the even elements (high nibbles)
    # and the odd ones (low nibbles) of the block are loaded as two [blocks, BLOCKSIZE / 2]
    # tiles. Blocksizes are even, so a byte never straddles two blocks.
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    pairs = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    even = pairs * 2
    odd = even + 1
    x_even = to_fp32(tl.load(a_ptr + even, mask=even < n_elements, other=0.0))
    x_odd = to_fp32(tl.load(a_ptr + odd, mask=odd < n_elements, other=0.0))

    # tl.max ignores NaN (see the blockwise kernel): a NaN in a block makes its absmax NaN.
    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    has_nan = tl.max(((x_even != x_even) | (x_odd != x_odd)).to(tl.int32), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), absmax)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)

    # v = x / absmax with IEEE division (div_rn), an all-zero block dividing by 1 (v = 0).
    divisor = tl.where(absmax == 0.0, 1.0, absmax)
    scale = tl.where(divisor < TINY_ABSMAX, TINY_ABSMAX_SCALE, 1.0)
    divisor = (divisor * scale)[:, None]
    v_even = tl.math.div_rn(x_even * scale[:, None], divisor)
    v_odd = tl.math.div_rn(x_odd * scale[:, None], divisor)
    hi = _encode(
        x_even, v_even, thresholds_ptr, code_of_index_ptr, SIGN_FROM_X, SIGN_BIT, SEARCH_STEPS
    )
    lo = _encode(
        x_odd, v_odd, thresholds_ptr, code_of_index_ptr, SIGN_FROM_X, SIGN_BIT, SEARCH_STEPS
    )
    lo = tl.where(odd < n_elements, lo, 0)  # an odd count leaves the last low nibble 0
    tl.store(packed_ptr + pairs, ((hi << 4) | lo).to(tl.uint8), mask=even < n_elements)


# --- dequantize -------------------------------------------------------------------------------


@triton.jit
def _dequantize_4bit_kernel(
    w_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    out_ptr,
    n_elements,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    elements = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    in_bounds = elements < n_elements
    offset = _load_offset(offset_ptr, NESTED)
    # One scale per tile row (block), broadcast over the block: the dequantize kernel's
    # tiles are block-aligned, unlike the matmul tiles.
    scale = _block_scales(
        blocks,
        blocks < n_blocks,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset,
        NESTED,
        NESTED_BLOCKSIZE,
    )
    codes = _load_codes(w_ptr, elements, in_bounds)
    out = tl.load(code_ptr + codes) * scale[:, None]
    tl.store(out_ptr + elements, fp32_to(out, out_ptr.dtype.element_ty), mask=in_bounds)


# --- matmul: GEMV (small M) -------------------------------------------------------------------


@triton.jit
def _gemv_4bit_kernel(
    x_ptr,
    w_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_xk,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row_start = cols.to(tl.int64) * K  # flat index of W[col, 0]
    offset = _load_offset(offset_ptr, NESTED)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        # Out-of-range k read x = 0, which zeroes their (finite) decoded weights.
        x = to_fp32(tl.load(x_ptr + row * stride_xm + ks * stride_xk, mask=k_mask, other=0.0))
        w = _decode_weight(
            row_start[:, None] + ks[None, :],
            col_mask[:, None] & k_mask[None, :],
            w_ptr,
            code_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset,
            BLOCKSIZE,
            NESTED,
            NESTED_BLOCKSIZE,
        )
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += to_fp32(tl.load(bias_ptr + cols, mask=col_mask, other=0.0))
    tl.store(out_ptr + row * N + cols, fp32_to(acc, out_ptr.dtype.element_ty), mask=col_mask)


# --- matmul: dequant-GEMM (larger M) ----------------------------------------------------------


@triton.jit
def _gemm_4bit_kernel(
    x_ptr,
    w_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The decoded weight's packed bytes are reused from L2 across a group of row tiles.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    col_start = cols.to(tl.int64) * K  # flat index of W[col, 0]
    offset = _load_offset(offset_ptr, NESTED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        # The weight tile transposed, [BLOCK_K, BLOCK_N], decoded in fp32 and rounded once
        # (to nearest even) to the dot dtype; x is widened (exactly) if the dot runs wider.
        w = _decode_weight(
            col_start[None, :] + ks[:, None],
            k_mask[:, None] & col_mask[None, :],
            w_ptr,
            code_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset,
            BLOCKSIZE,
            NESTED,
            NESTED_BLOCKSIZE,
        )
        w = fp32_to(w, DOT_DTYPE)
        if x.dtype != DOT_DTYPE:
            x = to_fp32(x)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += to_fp32(tl.load(bias_ptr + cols, mask=col_mask, other=0.0))[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(
        out, fp32_to(acc, out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :]
    )


# --- launch configuration ----------------------------------------------------------------------


def _blocks_per_program(blocksize: int) -> int:
    return max(1, TILE_ELEMENTS // blocksize)


def _gemv_config(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): a K step as long as K allows (up to GEMV_MAX_BLOCK_K)
    and as many output features as fill GEMV_TILE_ELEMENTS."""
    block_k = min(GEMV_MAX_BLOCK_K, triton.next_power_of_2(K))
    block_n = min(triton.next_power_of_2(N), max(1, GEMV_TILE_ELEMENTS // block_k))
    return block_n, block_k, num_warps_for(block_n * block_k)


def _dot_dtype(x_dtype: torch.dtype):
    """(tl dtype of the dot operands, input_precision) for x of ``x_dtype``.

    fp16 / bf16 x: the weight tile is rounded to x's dtype and the dot runs on tensor cores.
    The interpreter computes bf16 ``tl.dot`` wrongly, so there bf16 operands are widened to
    fp32 (exactly) instead: the result is then at least as accurate as on a GPU.
    fp32 x: fp32 operands, in IEEE fp32 unless torch allows TF32 for fp32 matmuls
    (``torch.set_float32_matmul_precision``), as F.linear does.
    With fp16 operands, decoded weights beyond fp16's range overflow, as they would in
    ``F.linear`` with the weight dequantized to fp16.
    """
    if x_dtype == torch.float32 or (x_dtype == torch.bfloat16 and interpreter_active()):
        tf32 = x_dtype == torch.float32 and tf32_allowed()
        return tl.float32, "tf32" if tf32 else "ieee"
    return _TL_DTYPE[x_dtype], "ieee"


def _gemm_config(M: int, N: int, dot_dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) from the shape: BLOCK_M covers small M in one
    tile row (no wasted rows beyond the next power of two), wide N tiles when M is large."""
    block_m = min(GEMM_MAX_BLOCK_M, max(GEMM_MIN_TILE, triton.next_power_of_2(M)))
    block_n = GEMM_BLOCK_N if block_m > 32 else GEMM_BLOCK_N_SMALL_M
    block_n = min(block_n, max(GEMM_MIN_TILE, triton.next_power_of_2(N)))
    block_k = GEMM_BLOCK_K_32BIT if dot_dtype == tl.float32 else GEMM_BLOCK_K_16BIT
    num_warps = 8 if block_m * block_n >= GEMM_WIDE_TILE else 4
    return block_m, block_n, block_k, num_warps


def _weight_pointers(A, absmax, code, nested_absmax, nested_code, offset) -> tuple:
    """The weight arguments of the kernels; without double quant the unused nested pointers
    are stand-ins that the kernels never read (NESTED is a compile-time False)."""
    nested = nested_absmax is not None
    return (
        A.contiguous().view(-1),
        code.contiguous(),
        absmax.contiguous(),
        nested_absmax.contiguous() if nested else absmax,
        nested_code.contiguous() if nested else absmax,
        offset.reshape(1) if nested else absmax,
    )


# --- the op kernels ------------------------------------------------------------------------------


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    a = A.contiguous().view(-1)
    n = a.numel()
    n_blocks = triton.cdiv(n, blocksize)
    packed = empty(((n + 1) // 2, 1), torch.uint8, A.device)
    absmax = empty((n_blocks,), torch.float32, A.device)
    thresholds, code_of_index = _encode_tables(quant_type, A.device)
    blocks_per_program = _blocks_per_program(blocksize)
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    with device_guard(A):
        _quantize_4bit_kernel[grid](
            a,
            thresholds,
            code_of_index,
            packed,
            absmax,
            n,
            n_blocks,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            SIGN_FROM_X=quant_type == "fp4",
            SIGN_BIT=FP4_SIGN_BIT,
            SEARCH_STEPS=SEARCH_STEPS,
            TINY_ABSMAX=TINY_ABSMAX,
            TINY_ABSMAX_SCALE=TINY_ABSMAX_SCALE,
            num_warps=num_warps_for(blocks_per_program * blocksize // 2),
        )
    return packed, absmax


def dequantize_4bit(
    A, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize
):
    out = empty(list(shape), dtype, A.device)
    n = out.numel()
    n_blocks = triton.cdiv(n, blocksize)
    blocks_per_program = _blocks_per_program(blocksize)
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    with device_guard(A):
        _dequantize_4bit_kernel[grid](
            *_weight_pointers(A, absmax, code, nested_absmax, nested_code, offset),
            out,
            n,
            n_blocks,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            NESTED=nested_absmax is not None,
            NESTED_BLOCKSIZE=nested_blocksize,
            num_warps=num_warps_for(blocks_per_program * blocksize),
            enable_fp_fusion=False,
        )
    return out


def matmul_4bit(
    x, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias
):
    """``x @ W.T + bias``: the GEMV for M <= GEMV_MAX_M rows of x, else the dequant-GEMM."""
    N, K = shape
    out = empty((*x.shape[:-1], N), x.dtype, x.device)
    x2 = int32_column_offsets(x.reshape(-1, K))
    M = x2.shape[0]
    if M == 0:
        return out
    weight = _weight_pointers(A, absmax, code, nested_absmax, nested_code, offset)
    common = dict(
        BLOCKSIZE=blocksize,
        NESTED=nested_absmax is not None,
        NESTED_BLOCKSIZE=nested_blocksize,
        HAS_BIAS=bias is not None,
        enable_fp_fusion=False,
    )
    bias_arg = bias.contiguous() if bias is not None else out
    with device_guard(x):
        if M <= GEMV_MAX_M:
            block_n, block_k, num_warps = _gemv_config(N, K)
            grid = (triton.cdiv(N, block_n), M)
            _gemv_4bit_kernel[grid](
                x2,
                *weight,
                bias_arg,
                out,
                N,
                K,
                x2.stride(0),
                x2.stride(1),
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                num_warps=num_warps,
                **common,
            )
        else:
            dot_dtype, input_precision = _dot_dtype(x.dtype)
            block_m, block_n, block_k, num_warps = _gemm_config(M, N, dot_dtype)
            grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
            _gemm_4bit_kernel[grid](
                x2,
                *weight,
                bias_arg,
                out,
                M,
                N,
                K,
                x2.stride(0),
                x2.stride(1),
                DOT_DTYPE=dot_dtype,
                INPUT_PRECISION=input_precision,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                GROUP_M=GEMM_GROUP_M,
                num_warps=num_warps,
                num_stages=GEMM_NUM_STAGES,
                **common,
            )
    return out


for _device in kernel_devices():
    register_kernel("quantize_4bit", backend="triton", device=_device)(quantize_4bit)
    register_kernel("dequantize_4bit", backend="triton", device=_device)(dequantize_4bit)
    register_kernel("matmul_4bit", backend="triton", device=_device)(matmul_4bit)

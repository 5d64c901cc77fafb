"""LLM.int8 in Triton: row quantization with outlier columns, and the int8 GEMM with its
dequantization, bias and outlier columns fused into one kernel.

Row quantization (``int8_quantize_weight``, ``int8_vectorwise_quant``) is memory-bound: one
program owns a block of rows and walks them twice in column tiles, first for the absmax,
then for the codes ``rint(x * (127 / absmax))`` (the reference's rule, ARCHITECTURE.md §4).
Outlier columns (any ``|x| >= threshold``) need a pass over every row first: a 2-D grid of
tiles marks them with an atomic max into a column flag array, ``torch.nonzero`` turns the
flags into the sorted index list (a host sync: the list's length is data-dependent), and the
quantization pass zeroes flagged columns before taking each row's absmax.

The GEMM (``int8_scaled_mm``, ``int8_linear``) runs ``tl.dot`` on int8 tiles with int32
accumulation (tensor cores on GPU: IMMA / int8 wgmma) and finishes in the epilogue of the
same kernel: ``acc * row_stat * (w_scale/127²)`` in float64 (rounded once to fp32), plus the
outlier term, plus bias, rounded once into the output dtype. The outlier term ``x[:, cols] @ W_deq[:, cols].T`` is a
second, small ``tl.dot`` in the same kernel, over the gathered outlier columns: x's tiles
are read as given, the weight's int8 columns are dequantized in fp32 exactly as the
reference does (``w * (w_scale / 127)``) and rounded into x's dtype, and the products are
accumulated in fp32 (fp16/bf16 tensor-core dots on GPU; fp32 inputs use an IEEE fp32 dot,
not TF32). No extra launch and no gathered copy of x or W is made.

Every launch passes ``enable_fp_fusion=False``: the rounding trick and the epilogue must not
be contracted into FMAs (the project builds with -ffp-contract=off / --fmad=false too).
The interpreter cannot autotune, so tile sizes are chosen by heuristic from the shape.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels.backends.triton._utils import (
    device_guard,
    fp32_to,
    grouped_tile,
    int32_column_offsets,
    interpreter_active,
    kernel_devices,
    num_warps_for,
    to_fp32,
)
from lowprec_kernels.reference.int8 import INT8_SCALE

# --- row quantization ------------------------------------------------------------------------

# A program's tile is at most ROW_TILE_ELEMENTS elements: up to MAX_ROW_TILE_COLS columns of
# one row, or several short rows (so narrow layers still give each program useful work).
ROW_TILE_ELEMENTS = 4096
MAX_ROW_TILE_COLS = 1024
# Outlier detection tiles: a 2-D grid over (rows, columns), one atomic per flagged column.
FLAG_TILE_ROWS = 32
FLAG_TILE_COLS = 128
# Adding then subtracting 1.5 * 2**23 rounds an fp32 value with |v| <= 2**22 to the nearest
# integer, ties to even (the fraction bits fall off the 24-bit significand). It is the rint
# of the reference, without libdevice (which the interpreter lacks); |v| <= 127 here, or
# +-inf / NaN, which pass through unchanged.
ROUND_MAGIC = 1.5 * 2**23

# --- the int8 GEMM ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Chosen by the number of rows M (the interpreter cannot autotune, and a GPU run should not
# pay for tuning on every new shape). int8 tiles are half the bytes of fp16 ones, so
# BLOCK_K is twice the usual fp16 choice. Decode-sized batches take a 16-row tile (the
# smallest int8 MMA) and a deep K step; large batches the square 128 x 128 tile.
GEMM_SMALL_M = GemmConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
GEMM_MEDIUM_M = GemmConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)
GEMM_LARGE_M = GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
SMALL_M_MAX = 16
MEDIUM_M_MAX = 64
# Output tiles are visited in groups of GROUP_M row-tiles, so that neighbouring programs
# share weight tiles in L2.
GROUP_M = 8
# Outlier columns per step of the second dot (the smallest K of a 16-bit MMA).
BLOCK_OUTLIERS = 16


def gemm_config(m: int) -> GemmConfig:
    if m <= SMALL_M_MAX:
        return GEMM_SMALL_M
    if m <= MEDIUM_M_MAX:
        return GEMM_MEDIUM_M
    return GEMM_LARGE_M


# --- kernels ---------------------------------------------------------------------------------


@triton.jit
def _outlier_flags_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    flags_ptr,
    n_rows,
    n_cols,
    threshold,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # One grid axis (a second one holds at most 65535 programs: 8.4M columns of tiles).
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(n_cols, BLOCK_COLS)
    rows = (pid // col_tiles) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % col_tiles) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0)
    # |NaN| >= threshold is false: NaN is never an outlier. threshold > 0 here, so the
    # masked-off zeros never count either.
    hit = tl.max((tl.abs(to_fp32(x)) >= threshold).to(tl.int32), axis=0)
    tl.atomic_max(flags_ptr + cols, hit, mask=(cols < n_cols) & (hit > 0))


@triton.jit
def _load_inlier_tile(
    x_ptr, stride_xm, stride_xk, flags_ptr, rows, cols, n_rows, n_cols, HAS_OUTLIERS: tl.constexpr
):
    """fp32 tile of x with outlier columns (and out-of-range elements) read as 0."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0)
    x = to_fp32(x)
    if HAS_OUTLIERS:
        flagged = tl.load(flags_ptr + cols, mask=cols < n_cols, other=0)
        x = tl.where(flagged[None, :] != 0, 0.0, x)
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    flags_ptr,
    codes_ptr,
    absmax_ptr,
    n_rows,
    n_cols,
    HAS_OUTLIERS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    INT8_SCALE: tl.constexpr,
    ROUND_MAGIC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_offsets = tl.arange(0, BLOCK_COLS)

    absmax = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    has_nan = tl.zeros((BLOCK_ROWS,), dtype=tl.int32)
    for k in range(0, n_cols, BLOCK_COLS):
        x = _load_inlier_tile(
            x_ptr, stride_xm, stride_xk, flags_ptr, rows, k + col_offsets, n_rows, n_cols,
            HAS_OUTLIERS,
        )  # fmt: skip
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32), axis=1))
    # tl.max ignores NaN (maxnum on GPU), but a NaN in a row must make its absmax NaN.
    absmax = tl.where(has_nan > 0, float("nan"), absmax)
    tl.store(absmax_ptr + rows, absmax, mask=rows < n_rows)

    # The reference's scale: `127 / absmax` as ONE fp32 division, so a code at a .5 tie
    # matches. IEEE division (plain `/` is approximate on NVIDIA): inf for a zero absmax, NaN for a
    # NaN one, 0 for an infinite one; the NaN codes that follow become 0, as specified.
    # Rows past the end divide 1 by 1 instead of 0 (their results are never stored).
    divisor = tl.where(rows < n_rows, absmax, 1.0)
    scale = tl.math.div_rn(tl.full((BLOCK_ROWS,), INT8_SCALE, tl.float32), divisor)
    for k in range(0, n_cols, BLOCK_COLS):
        cols = k + col_offsets
        x = _load_inlier_tile(
            x_ptr, stride_xm, stride_xk, flags_ptr, rows, cols, n_rows, n_cols, HAS_OUTLIERS
        )
        v = x * scale[:, None]
        q = (v + ROUND_MAGIC) - ROUND_MAGIC
        q = tl.where(q != q, 0.0, q)
        q = tl.minimum(tl.maximum(q, -INT8_SCALE), INT8_SCALE)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        tl.store(codes_ptr + rows[:, None] * n_cols + cols[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    stride_am,
    stride_ak,
    w_ptr,
    stride_wn,
    stride_wk,
    row_stats_ptr,
    w_scale_ptr,
    bias_ptr,
    x_ptr,
    stride_xm,
    stride_xk,
    outlier_cols_ptr,
    n_outliers,
    out_ptr,
    stride_om,
    stride_on,
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    OUTLIER_DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUTLIERS: tl.constexpr,
    GROUP_M: tl.constexpr,
    INT8_SCALE: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 offsets: a [M, K] activation or a weight can pass 2**31 elements.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row/column 0 (wrapped) instead of masking every load
    # of the K loop; their results are never stored.
    a_ptrs = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + (cols % N)[None, :] * stride_wn + ks[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        k_in = (k + ks) < K
        a = tl.load(a_ptrs, mask=k_in[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_in[:, None], other=0)
        # int8 x int8 -> int32: exact (|acc| < 2**31 up to _ops.INT8_INT32_EXACT_MAX_K columns;
        # wider rows run the reference). out_dtype is required:
        # its default (fp32) fails to compile on a GPU, though the interpreter accepts it.
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # y = acc * row_stat * (w_scale / 127²) in float64, rounded once to fp32, as the reference
    # and the CPU kernels compute it (csrc/include/lowprec/int8.h): in fp32 the product
    # overflowed at extreme scales and lost bits below FLT_MIN. (An epilogue's few float64
    # operations per output, beside the K multiply-adds of its dot.)
    row_stats = tl.load(row_stats_ptr + rows, mask=row_in, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=col_in, other=0.0)
    col_scale64 = w_scale.to(tl.float64) / (INT8_SCALE * INT8_SCALE)
    y = (acc.to(tl.float64) * row_stats.to(tl.float64)[:, None] * col_scale64[None, :]).to(
        tl.float32
    )

    if HAS_OUTLIERS:
        outlier_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        os = tl.arange(0, BLOCK_OUTLIERS)
        for o in range(0, n_outliers, BLOCK_OUTLIERS):
            o_in = (o + os) < n_outliers
            oc = tl.load(outlier_cols_ptr + o + os, mask=o_in, other=0)
            xo = tl.load(
                x_ptr + rows[:, None] * stride_xm + oc[None, :] * stride_xk,
                mask=row_in[:, None] & o_in[None, :],
                other=0,
            )
            wo = tl.load(
                w_ptr + cols[None, :] * stride_wn + oc[:, None] * stride_wk,
                mask=o_in[:, None] & col_in[None, :],
                other=0,
            )
            # W_deq exactly as the reference makes it, then rounded into x's dtype.
            col_scale = tl.math.div_rn(w_scale, tl.full((BLOCK_N,), INT8_SCALE, tl.float32))
            wo = fp32_to(wo.to(tl.float32) * col_scale[None, :], xo.dtype)
            if OUTLIER_DOT_FP32:
                # fp32 x; or bf16 under the interpreter, whose bf16 dot is wrong: bf16
                # products are exact in fp32, so this is the GPU's bf16 dot (fp32 sums).
                outlier_acc = tl.dot(to_fp32(xo), to_fp32(wo), outlier_acc, input_precision="ieee")
            else:
                outlier_acc = tl.dot(xo, wo, outlier_acc)
        y = y + outlier_acc

    if HAS_BIAS:
        bias = to_fp32(tl.load(bias_ptr + cols, mask=col_in, other=0))
        y = y + bias[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, fp32_to(y, out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


# --- launchers -------------------------------------------------------------------------------


def _outlier_columns(x2d: torch.Tensor, threshold: float):
    """(int32 column flags or None when there are no outliers, sorted int64 column indices)."""
    n_rows, n_cols = x2d.shape
    if threshold <= 0.0:
        return None, torch.empty(0, dtype=torch.int64, device=x2d.device)
    flags = torch.zeros(n_cols, dtype=torch.int32, device=x2d.device)  # atomics need zeros
    grid = (triton.cdiv(n_rows, FLAG_TILE_ROWS) * triton.cdiv(n_cols, FLAG_TILE_COLS),)
    with device_guard(x2d):
        _outlier_flags_kernel[grid](
            x2d,
            x2d.stride(0),
            x2d.stride(1),
            flags,
            n_rows,
            n_cols,
            float(threshold),
            BLOCK_ROWS=FLAG_TILE_ROWS,
            BLOCK_COLS=FLAG_TILE_COLS,
            num_warps=num_warps_for(FLAG_TILE_ROWS * FLAG_TILE_COLS),
            enable_fp_fusion=False,
        )
    cols = torch.nonzero(flags).view(-1)
    return (flags if cols.numel() else None), cols


def _quantize_rows(x2d: torch.Tensor, flags: torch.Tensor | None):
    """int8 codes [rows, cols] (contiguous) and fp32 row absmax of a 2-D (strided) tensor."""
    n_rows, n_cols = x2d.shape
    codes = empty((n_rows, n_cols), torch.int8, x2d.device)
    absmax = empty((n_rows,), torch.float32, x2d.device)
    block_cols = min(triton.next_power_of_2(max(n_cols, 1)), MAX_ROW_TILE_COLS)
    block_rows = min(ROW_TILE_ELEMENTS // block_cols, triton.next_power_of_2(n_rows))
    with device_guard(x2d):
        _quantize_rows_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2d,
            x2d.stride(0),
            x2d.stride(1),
            flags if flags is not None else codes,  # never read without outliers
            codes,
            absmax,
            n_rows,
            n_cols,
            HAS_OUTLIERS=flags is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            INT8_SCALE=INT8_SCALE,
            ROUND_MAGIC=ROUND_MAGIC,
            num_warps=num_warps_for(block_rows * block_cols),
            enable_fp_fusion=False,
        )
    return codes, absmax


def _int8_gemm(a2d, row_stats, weight, weight_scale, bias, out2d, x2d=None, outlier_cols=None):
    """out2d = a2d @ weight.T scaled (+ the outlier columns of x2d) (+ bias); out2d non-empty."""
    M, K = a2d.shape
    N = weight.shape[0]
    weight = int32_column_offsets(weight)
    cfg = gemm_config(M)
    n_outliers = 0 if outlier_cols is None else outlier_cols.numel()
    has_outliers = n_outliers > 0
    if not has_outliers:
        x2d, outlier_cols = a2d, row_stats  # placeholders, never read
    x_dtype = x2d.dtype
    outlier_dot_fp32 = x_dtype == torch.float32 or (
        x_dtype == torch.bfloat16 and interpreter_active()
    )
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    with device_guard(a2d):
        _int8_gemm_kernel[grid](
            a2d, a2d.stride(0), a2d.stride(1),
            weight, weight.stride(0), weight.stride(1),
            row_stats.contiguous(), weight_scale.contiguous(),
            bias.contiguous() if bias is not None else row_stats,  # never read without bias
            x2d, x2d.stride(0), x2d.stride(1), outlier_cols, n_outliers,
            out2d, out2d.stride(0), out2d.stride(1),
            M, N, K,
            HAS_BIAS=bias is not None,
            HAS_OUTLIERS=has_outliers,
            OUTLIER_DOT_FP32=outlier_dot_fp32,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_OUTLIERS=BLOCK_OUTLIERS,
            GROUP_M=GROUP_M,
            INT8_SCALE=INT8_SCALE,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            enable_fp_fusion=False,
        )  # fmt: skip


# --- op kernels (validated arguments: lowprec_kernels/_ops.py) ---------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D [rows, features] (a view when the strides allow it; 0 features too),
    copied where its column offsets would overflow the kernels' int32."""
    return int32_column_offsets(t.reshape(math.prod(t.shape[:-1]), t.shape[-1]))


def int8_quantize_weight(W: torch.Tensor):
    return _quantize_rows(int32_column_offsets(W), None)


def int8_vectorwise_quant(A: torch.Tensor, threshold: float):
    x2d = _as_rows(A)
    if x2d.shape[0] == 0:  # no rows: no outliers either
        codes = empty(A.shape, torch.int8, A.device)
        return codes, empty((0,), torch.float32, A.device), empty((0,), torch.int64, A.device)
    flags, cols = _outlier_columns(x2d, threshold)
    codes, absmax = _quantize_rows(x2d, flags)
    out_cols = empty(cols.shape, torch.int64, A.device)
    out_cols.copy_(cols)
    return codes.view(A.shape), absmax, out_cols


def int8_scaled_mm(A, row_stats, weight, weight_scale, bias, dtype):
    N = weight.shape[0]
    out = empty((*A.shape[:-1], N), dtype, A.device)
    if out.numel() > 0:
        _int8_gemm(_as_rows(A), row_stats, weight, weight_scale, bias, out.view(-1, N))
    return out


def int8_linear(x, weight, weight_scale, bias, threshold):
    N = weight.shape[0]
    out = empty((*x.shape[:-1], N), x.dtype, x.device)
    if out.numel() == 0:
        return out
    x2d = _as_rows(x)
    flags, cols = _outlier_columns(x2d, threshold)
    codes, absmax = _quantize_rows(x2d, flags)
    _int8_gemm(codes, absmax, weight, weight_scale, bias, out.view(-1, N), x2d, cols)
    return out


for _device in kernel_devices():
    for _op, _kernel in (
        ("int8_quantize_weight", int8_quantize_weight),
        ("int8_vectorwise_quant", int8_vectorwise_quant),
        ("int8_scaled_mm", int8_scaled_mm),
        ("int8_linear", int8_linear),
    ):
        register_kernel(_op, backend="triton", device=_device)(_kernel)

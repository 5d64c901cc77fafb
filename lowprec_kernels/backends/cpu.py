"""The ``cpu`` backend: C++ kernels of ``lowprec_kernels._C`` registered for CPU tensors.

Each kernel has exactly its op's signature and receives validated arguments
(``lowprec_kernels/_ops.py``); it makes its inputs contiguous, allocates the outputs (through
``_alloc``, so tests can poison them) and calls the native function, which fills them. One
section per kernel family.
"""

from __future__ import annotations

import torch

from lowprec_kernels import _C
from lowprec_kernels._alloc import empty, poison
from lowprec_kernels._dispatch import mark_available, register_eager, register_kernel
from lowprec_kernels._ops import num_blocks
from lowprec_kernels._tables import shared_code_4bit

# --------------------------------------------------------------------------- blockwise 8-bit


def _quantize_blockwise(native, A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Calls ``native`` (``_C.quantize_blockwise_{cpu,cuda}``) with fresh outputs."""
    A = A.contiguous()
    codes = empty(A.shape, torch.uint8, A.device)
    absmax = empty((num_blocks(A.numel(), blocksize),), torch.float32, A.device)
    native(A, code.contiguous(), blocksize, codes, absmax)
    return codes, absmax


def _dequantize_blockwise(native, A, absmax, code, blocksize, dtype):
    """Calls ``native`` (``_C.dequantize_blockwise_{cpu,cuda}``) with a fresh output."""
    A = A.contiguous()
    out = empty(A.shape, dtype, A.device)
    native(A, absmax.contiguous(), code.contiguous(), blocksize, out)
    return out


@register_kernel("quantize_blockwise", backend="cpu", device="cpu")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    return _quantize_blockwise(_C.quantize_blockwise_cpu, A, code, blocksize)


@register_kernel("dequantize_blockwise", backend="cpu", device="cpu")
def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
):
    return _dequantize_blockwise(_C.dequantize_blockwise_cpu, A, absmax, code, blocksize, dtype)


# --------------------------------------------------------------------------- 8-bit Adam


def _adam8bit_multi_step(native, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                         steps, skipped, *hyper):  # fmt: skip
    """Calls ``native`` (``_C.adam8bit_multi_step_{cpu,cuda}``) on contiguous tensors.

    ``p`` and the codes are contiguous (the op's checker requires it); a non-contiguous scale,
    step or counter (all updated in place) is updated through a contiguous copy written back.
    """
    updated = [*absmax1, *absmax2, *steps, *skipped]
    work = [t if t.is_contiguous() else t.contiguous() for t in updated]
    n = len(params)
    native(
        list(params), [g.contiguous() for g in grads], list(state1), list(state2),
        work[:n], work[n : 2 * n], qmap1.contiguous(), qmap2.contiguous(),
        work[2 * n : 3 * n], work[3 * n :], *hyper,
    )  # fmt: skip
    for original, copy in zip(updated, work):
        if copy is not original:
            original.copy_(copy)


@register_kernel("adam8bit_multi_step_", backend="cpu", device="cpu")
def adam8bit_multi_step_(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps,
                         skipped, *hyper):  # fmt: skip
    _adam8bit_multi_step(_C.adam8bit_multi_step_cpu, params, grads, state1, state2, absmax1,
                         absmax2, qmap1, qmap2, steps, skipped, *hyper)  # fmt: skip


@register_kernel("adam8bit_step_", backend="cpu", device="cpu")
def adam8bit_step_(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped, *hyper):
    _adam8bit_multi_step(_C.adam8bit_multi_step_cpu, [p], [g], [state1], [state2], [absmax1],
                         [absmax2], qmap1, qmap2, [step], [skipped], *hyper)  # fmt: skip


@register_kernel("adam_multi_step_", backend="cpu", device="cpu")
def adam_multi_step_(params, grads, exp_avgs, exp_avg_sqs, steps, skipped, *hyper):
    # p and the states are contiguous (the op's checker requires it); steps and counters hold
    # one element.
    _C.adam_multi_step_cpu(
        list(params), [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
        list(steps), list(skipped), *hyper,
    )  # fmt: skip


# --------------------------------------------------------------------------- LLM.int8


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


def _float32_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    # Every float dtype converts to float32 exactly: the kernel adds the bias in float32.
    return None if bias is None else bias.to(torch.float32).contiguous()


def _int8_quantize_weight(native, W: torch.Tensor):
    """Calls ``native`` (``_C.int8_quantize_weight_{cpu,cuda}``) with fresh outputs."""
    W = W.contiguous()
    codes = empty(W.shape, torch.int8, W.device)
    absmax = empty((W.shape[0],), torch.float32, W.device)
    native(W, codes, absmax)
    return codes, absmax


@register_kernel("int8_quantize_weight", backend="cpu", device="cpu")
def int8_quantize_weight(W: torch.Tensor):
    return _int8_quantize_weight(_C.int8_quantize_weight_cpu, W)


@register_kernel("int8_vectorwise_quant", backend="cpu", device="cpu")
def int8_vectorwise_quant(A: torch.Tensor, threshold: float):
    A = A.contiguous()
    codes = empty(A.shape, torch.int8, A.device)
    row_absmax = empty((_rows(A),), torch.float32, A.device)
    found = torch.empty(A.shape[-1], dtype=torch.int64)  # scratch: the first `count` are written
    count = _C.int8_vectorwise_quant_cpu(A, threshold, codes, row_absmax, found)
    outlier_cols = empty((count,), torch.int64, A.device)
    outlier_cols.copy_(found[:count])
    return codes, row_absmax, outlier_cols


@register_kernel("int8_scaled_mm", backend="cpu", device="cpu")
def int8_scaled_mm(A, row_stats, weight, weight_scale, bias, dtype):
    A = A.contiguous()
    out = empty((*A.shape[:-1], weight.shape[0]), dtype, A.device)
    _C.int8_scaled_mm_cpu(
        A, row_stats.contiguous(), weight.contiguous(), weight_scale.contiguous(),
        _float32_bias(bias), out,
    )  # fmt: skip
    return out


@register_kernel("int8_linear", backend="cpu", device="cpu")
def int8_linear(x, weight, weight_scale, bias, threshold):
    x = x.contiguous()
    out = empty((*x.shape[:-1], weight.shape[0]), x.dtype, x.device)
    _C.int8_linear_cpu(
        x, weight.contiguous(), weight_scale.contiguous(), _float32_bias(bias), threshold, out
    )
    return out


# --------------------------------------------------------------------------- NF4 / FP4

# matmul_4bit dispatch rule (x flattened to [rows, in_features]): up to
# GEMV_MAX_ROWS[cpu path][x.dtype] rows the fused GEMV kernel (each weight block decoded in
# registers once per group of 4 rows of x, never written out; with one group, M <= 4 or bf16
# M <= 2, it streams the weight rows in order); above that the GEMM path: tiles of weight rows
# decoded into a per-thread cache-resident buffer, then multiplied there (bf16: oneDNN's brgemm
# microkernel on tiles decoded straight into its VNNI layout, where torch has it and
# in_features is a multiple of 32 and of the blocksize; computed in fp32 on the AVX-512 path,
# up to 128 rows and in_features even: oneDNN's fp32 brgemm microkernel, where torch has oneDNN
# and mkldnn is enabled; otherwise torch's GEMM per tile. _C.matmul_4bit_gemm_kernel_cpu
# names the kernel).
# An x86 CPU without AVX512_BF16 computes bf16 x in fp32 on both paths, so on AVX-512 bf16
# takes fp32's crossover there ("avx512" below; "avx512_bf16" is AVX-512 with it).
# Crossovers, GEMV / GEMM time at 4096 x 4096, 2 threads (the AVX2 and scalar rows with torch's
# GEMM held to the same instructions; benchmarks/results/cpu-nf4.md):
# * avx512_bf16, measured on AMD Zen 5: bf16 0.87 at 4 rows, 1.10 at 5, 1.21 at 6 (the brgemm
#   path; at 11008 x 4096: 0.70, 0.94, 1.05); fp32 and fp16 (computed in fp32) 0.5 at 17 rows,
#   0.86-0.88 at 256-512, 0.93 at 1024, above 1 at 2048 (against torch's GEMM per tile; the
#   fp32 brgemm path, which there runs only beyond 512 rows, was not measured there, nor was an
#   Intel CPU with AVX512_BF16: on the Intel below, whose GEMV has half of Zen 5's vector ports
#   at 512 bits and one shuffle port, fp32 crosses at 12-14 rows);
# * avx512, measured on Intel Emerald Rapids with BF16 hidden by its hypervisor: fp32, fp16
#   and bf16 (all three computed in fp32), against the fp32 brgemm path: 0.89 at 12 rows,
#   1.06 at 14, 1.18 at 16; at 11008 x 11008: 0.94 at 12, 1.04-1.09 at 13-14 (against torch's
#   GEMM per 4 MiB tile, which "avx512_torch_gemm" takes where the brgemm path does not run:
#   1.00 at 40 rows; at 11008, 1.00 at 32);
# * avx2: bf16 0.5 up to 16 rows (no brgemm there); fp32 0.5-0.8 at 16-32 rows, about 1 near 48;
# * scalar: on x86 (no AVX2, torch's GEMM held to SSE4) the GEMV was 4x slower at one row,
#   more above; but the scalar path is mostly every target other than x86 (aarch64), where it
#   is compiled for NEON and was not measured, so it keeps the thresholds it had. (The GEMV is
#   also what keeps a row's result independent of the batch around it: torch's GEMM is not.)
GEMV_MAX_ROWS = {
    "avx512_bf16": {torch.float32: 512, torch.bfloat16: 5, torch.float16: 512},
    "avx512": {torch.float32: 12, torch.bfloat16: 12, torch.float16: 12},
    "avx512_torch_gemm": {torch.float32: 32, torch.bfloat16: 32, torch.float16: 32},
    "avx2": {torch.float32: 16, torch.bfloat16: 16, torch.float16: 16},
    "scalar": {torch.float32: 16, torch.bfloat16: 6, torch.float16: 16},
}
# Fixed for the process (a CPU feature); the path in force is not (_C.set_cpu_isa).
_CPU_HAS_AVX512_BF16 = _C.cpu_has_avx512_bf16()


def gemv_max_rows(dtype: torch.dtype) -> int:
    """The rows of x up to which matmul_4bit takes the GEMV on the CPU path in force."""
    path = _C.get_cpu_isa()
    if path == "avx512" and _CPU_HAS_AVX512_BF16:
        path = "avx512_bf16"
    elif path == "avx512" and not _C.cpu_fp32_brgemm_available():
        path = "avx512_torch_gemm"
    return GEMV_MAX_ROWS[path].get(dtype, 0)


def _optional(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _quantize_4bit(native, A: torch.Tensor, blocksize: int, quant_type: str):
    """Calls ``native`` (``_C.quantize_4bit_{cpu,cuda}``) with fresh outputs."""
    A = A.contiguous()
    n = A.numel()
    packed = empty(((n + 1) // 2, 1), torch.uint8, A.device)
    absmax = empty((num_blocks(n, blocksize),), torch.float32, A.device)
    native(A, shared_code_4bit(quant_type, A.device), blocksize, quant_type, packed, absmax)
    return packed, absmax


def _weight_args(A, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize):
    return (
        A.contiguous(), absmax.contiguous(), code.contiguous(), blocksize,
        _optional(nested_absmax), _optional(nested_code), _optional(offset), nested_blocksize,
    )  # fmt: skip


def _dequantize_4bit(native, A, absmax, code, blocksize, shape, dtype, *nested):
    """Calls ``native`` (``_C.dequantize_4bit_{cpu,cuda}``) with a fresh output."""
    out = empty(list(shape), dtype, A.device)
    native(*_weight_args(A, absmax, code, blocksize, *nested), out)
    return out


@register_kernel("quantize_4bit", backend="cpu", device="cpu")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    return _quantize_4bit(_C.quantize_4bit_cpu, A, blocksize, quant_type)


@register_kernel("dequantize_4bit", backend="cpu", device="cpu")
def dequantize_4bit(A, absmax, code, blocksize, shape, dtype, *nested):
    return _dequantize_4bit(
        _C.dequantize_4bit_cpu, A, absmax, code, blocksize, shape, dtype, *nested
    )


@register_kernel("matmul_4bit", backend="cpu", device="cpu")
def matmul_4bit(
    x, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias
):
    out_features, in_features = shape
    out = empty((*x.shape[:-1], out_features), x.dtype, x.device)
    x2d = x.reshape(-1, in_features).contiguous()
    if x2d.shape[0] == 0:
        return out
    weight = _weight_args(
        A, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize
    )
    rows = x2d.shape[0]
    kernel = _C.matmul_4bit_gemv_cpu if rows <= gemv_max_rows(x.dtype) else _C.matmul_4bit_gemm_cpu
    kernel(x2d, *weight, _optional(bias), out.view(rows, out_features))
    return out


def _eager_or_none(entry, *args):
    """``entry(*args)``, a native eager entry, or None where an argument is of the wrong kind
    (pybind refuses it): the checked path then names it."""
    try:
        return entry(*args)
    except (TypeError, AttributeError):
        return None


# The optimizers' steps (through _ops.route_mutating): the Python checks of each tensor cost
# ~2 us, as much as the binding's C++ checks and the kernel of a 4096-element tensor together.
# Python floats and ints only: pybind would convert other numbers (a Decimal, a 0-dim tensor)
# before the native checks see them, where the Python checks compare them as they are.
@register_eager("adam8bit_multi_step_", backend="cpu", device="cpu")
def adam8bit_multi_step_eager(*args):
    lr, beta1, beta2, eps, weight_decay, _, gnorm_scale, blocksize = args[10:]
    if not _floats_and_int((lr, beta1, beta2, eps, weight_decay, gnorm_scale), blocksize):
        return None
    return _eager_or_none(_C.adam8bit_multi_step_eager_cpu, *args)


@register_eager("adam_multi_step_", backend="cpu", device="cpu")
def adam_multi_step_eager(*args):
    lr, beta1, beta2, eps, weight_decay, _, gnorm_scale = args[6:]
    if not _floats_and_int((lr, beta1, beta2, eps, weight_decay, gnorm_scale)):
        return None
    return _eager_or_none(_C.adam_multi_step_eager_cpu, *args)


def _floats_and_int(floats, integer: int = 0) -> bool:
    return all(type(x) is float for x in floats) and type(integer) is int


@register_eager("matmul_4bit", backend="cpu", device="cpu")
def matmul_4bit_eager(
    x, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias
):
    """The call above in one native step (``_C.matmul_4bit_eager_cpu``), or None for arguments
    it does not accept (the checker then reports them)."""
    return _eager_or_none(
        _C.matmul_4bit_eager_cpu, x, A, absmax, code, blocksize, shape, nested_absmax,
        nested_code, offset, nested_blocksize, bias, gemv_max_rows(x.dtype),
        poison(x.dtype),
    )  # fmt: skip


mark_available("cpu")

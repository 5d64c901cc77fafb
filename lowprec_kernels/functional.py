"""The user-facing functions: thin, documented wrappers over ``torch.ops.lowprec``.

Defaults: blocksize 256 for 8-bit (bitsandbytes' 8-bit optimizers use it; its
``quantize_blockwise`` defaults to 4096, so pass ``blocksize`` when decoding its codes), 64
for 4-bit, NF4 with double quantization (QLoRA's choice; bitsandbytes' functional and layer
default is FP4 without it), LLM.int8 threshold 6.0 (the paper's and Hugging Face's
``llm_int8_threshold``; bitsandbytes' ``Linear8bitLt`` defaults to 0.0, no outlier columns).
Validation happens once, in the ops (``_ops.py``).
"""

from __future__ import annotations

import torch

from lowprec_kernels import _ops  # also defines torch.ops.lowprec
from lowprec_kernels._tables import shared_code_4bit, shared_dynamic_map
from lowprec_kernels.quant_state import NESTED_BLOCKSIZE, QuantState
from lowprec_kernels.reference import codebooks

__all__ = [
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "dequantize_4bit",
    "matmul_4bit",
    "int8_quantize_weight",
    "int8_vectorwise_quant",
    "int8_scaled_mm",
    "int8_linear",
    "adam8bit_step_",
]


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map: float32[256], sorted ascending (a fresh tensor), on
    ``device`` (default: torch's default device, as a factory function's)."""
    return codebooks.dynamic_map(signed, device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256):
    """Blockwise 8-bit quantization: ``(codes uint8 like x, absmax float32 [nblocks])``.

    ``code`` defaults to the signed dynamic map. NaN in a block makes its absmax NaN (and
    its codes 0); an all-zero block encodes as the index of 0.0. An infinite element makes
    its block's absmax infinite: ``x / absmax`` is then NaN for it (code 0) and 0 for the
    others, so the block decodes to NaN, the infinite element to ``code[0] * inf`` (-inf with
    the signed map, whatever its sign).
    """
    if code is None and isinstance(x, torch.Tensor):
        code = shared_dynamic_map(True, x.device)
    blocksize = _ops.int_argument("quantize_blockwise", "blocksize", blocksize)
    return _ops.call("quantize_blockwise", x, code, blocksize)


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in ``dtype``."""
    if code is None and isinstance(q, torch.Tensor):
        code = shared_dynamic_map(True, q.device)
    blocksize = _ops.int_argument("dequantize_blockwise", "blocksize", blocksize)
    return _ops.call("dequantize_blockwise", q, absmax, code, blocksize, dtype)


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """4-bit quantization of a tensor of any rank: ``(packed uint8 [(n+1)//2, 1], QuantState)``.

    With ``double_quant`` the block absmax values are themselves stored as 8-bit codes
    (blocks of 256, signed dynamic map) around their mean: 4.127 bits per weight at
    blocksize 64. A NaN or infinite weight makes its block's absmax NaN or infinite; with
    ``double_quant`` it also makes that mean, and so every decoded weight of the tensor,
    non-finite (as in bitsandbytes, whose layout this is): check weights first where that
    matters. In a block with an infinite absmax the infinite weight codes as 0 (its
    ``x / absmax`` is NaN) and decodes to ``code[0] * inf`` (-inf for NF4, whatever its sign;
    NaN for FP4, whose code 0 is 0.0), the others to NaN (0 * inf).
    """
    blocksize = _ops.int_argument("quantize_4bit", "blocksize", blocksize)
    packed, absmax = _ops.call("quantize_4bit", w, blocksize, quant_type)
    nested = {}
    if double_quant:
        offset = absmax.mean()
        nested_code = shared_dynamic_map(True, w.device).clone()
        absmax, nested_absmax = _ops.call(
            "quantize_blockwise", absmax - offset, nested_code, NESTED_BLOCKSIZE
        )
        nested = dict(
            nested_absmax=nested_absmax,
            nested_code=nested_code,
            nested_blocksize=NESTED_BLOCKSIZE,
            offset=offset,
        )
    state = QuantState(
        quant_type=quant_type,
        blocksize=blocksize,
        shape=w.shape,
        dtype=w.dtype,
        absmax=absmax,
        code=shared_code_4bit(quant_type, w.device).clone(),
        **nested,
    )
    return packed, state


def _check_state(fn: str, st) -> None:
    if not isinstance(st, QuantState):
        raise TypeError(
            f"{fn}: quant_state must be a lowprec_kernels.QuantState, got {type(st).__name__}"
        )


def dequantize_4bit(qw: torch.Tensor, quant_state: QuantState, dtype=None) -> torch.Tensor:
    """Decodes a 4-bit tensor to ``dtype`` (default: the original ``quant_state.dtype``)."""
    _check_state("dequantize_4bit", quant_state)
    absmax, code, bs, shape, *nested = quant_state.op_args()
    return _ops.call(
        "dequantize_4bit", qw, absmax, code, bs, shape, dtype or quant_state.dtype, *nested
    )


def matmul_4bit(
    x: torch.Tensor, qw: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequantize_4bit(qw).T + bias`` fused, in x's dtype; differentiable in x and bias.

    The kernels accumulate in float32. Where a backend hands a large batch to a GEMM of x's
    dtype (on CUDA: more than 8 rows of x go to the weight decoded into x's dtype, then
    cuBLAS, as torchao does), the result follows torch's matmul settings as ``F.linear``'s
    does (TF32 for float32 if allowed, reduced-precision reductions for fp16 / bf16), and a
    decoded weight beyond fp16's range overflows with fp16 x, as it would in ``F.linear``.

    bf16 x on the CPU: on a CPU with AVX512-BF16, its GEMV and the bf16 GEMMs count
    subnormal bf16 values (below 2**-126, in x or in the decoded weight) as zero, as the
    hardware's bf16 dot products do (``F.linear``'s bf16 GEMM on the CPU does the same); the
    scalar and AVX2 GEMV keep them. Normal values are unaffected. An x86 CPU without
    AVX512-BF16 computes bf16 x in float32 on every path (its bf16 GEMMs would be emulated,
    several times slower), rounding the result to bf16 once.
    """
    _check_state("matmul_4bit", quant_state)
    return _ops.call("matmul_4bit", x, qw, *quant_state.op_args(), bias)


def int8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row int8 weight: ``(codes int8 [out, in], absmax float32 [out])``."""
    return _ops.call("int8_quantize_weight", w)


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0):
    """Per-row int8 activations with outlier columns: ``(codes, row_absmax, outlier_cols)``.

    A column is an outlier when any ``|x| >= threshold`` (threshold 0: none); outlier columns
    are zeroed in the codes and each row's absmax ignores them. ``outlier_cols`` is a sorted
    int64 1-D tensor, empty when there are none.
    """
    return _ops.call(
        "int8_vectorwise_quant", x, _ops.threshold_value("int8_vectorwise_quant", threshold)
    )


def int8_scaled_mm(
    xq: torch.Tensor,
    row_stats: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The int8 GEMM with fused dequantization: ``(xq @ wq.T) * row * col / 127**2 + bias``."""
    return _ops.call("int8_scaled_mm", xq, row_stats, wq, w_scale, bias, dtype)


def int8_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8 ``x @ W.T + bias``: int8 GEMM plus the outlier columns in x's dtype.

    Differentiable in x (``grad_x = grad_y @ W_deq``) and bias.
    """
    return _ops.call(
        "int8_linear", x, wq, w_scale, bias, _ops.threshold_value("int8_linear", threshold)
    )


def adam8bit_step_(
    p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
    decoupled: bool = True, gnorm_scale: float = 1.0, blocksize: int = 256,
) -> None:  # fmt: skip
    """One fused 8-bit Adam (``decoupled=False``) or AdamW step, in place.

    A gradient with any non-finite value leaves ``p``, the states and ``step`` unchanged
    and adds one to ``skipped``. ``step`` (t - 1) must be a finite number >= 0: the reference
    and CPU kernels refuse another before writing anything; the CUDA and Triton kernels read
    it on the device and do not check it.
    """
    torch.ops.lowprec.adam8bit_step_(
        p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped,
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        bool(decoupled), float(gnorm_scale), int(blocksize),
    )  # fmt: skip

"""The ``cuda`` backend: CUDA C++ kernels of ``lowprec_kernels._C`` registered for CUDA tensors.

Present when the extension was built with CUDA (``_C.build_info()["cuda_compiled"]``) and
usable when a GPU is visible. Kernels have exactly their op's signature and receive
validated arguments; the native functions launch on the current stream of the tensors'
device. One section per kernel family.
"""

from __future__ import annotations

import torch

from lowprec_kernels import _C
from lowprec_kernels._alloc import empty, poison
from lowprec_kernels._dispatch import mark_available, register_eager, register_kernel
from lowprec_kernels.backends.cpu import (
    _adam8bit_multi_step,
    _dequantize_4bit,
    _dequantize_blockwise,
    _eager_or_none,
    _float32_bias,
    _int8_quantize_weight,
    _quantize_4bit,
    _quantize_blockwise,
    _rows,
    _weight_args,
)

COMPILED = hasattr(_C, "quantize_blockwise_cuda")


# --------------------------------------------------------------------------- blockwise 8-bit


@register_kernel("quantize_blockwise", backend="cuda", device="cuda")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    return _quantize_blockwise(_C.quantize_blockwise_cuda, A, code, blocksize)


@register_kernel("dequantize_blockwise", backend="cuda", device="cuda")
def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
):
    return _dequantize_blockwise(_C.dequantize_blockwise_cuda, A, absmax, code, blocksize, dtype)


# --------------------------------------------------------------------------- 8-bit Adam
# Three launches per group of 32 tensors (finiteness, update, step counters), no host sync.


@register_kernel("adam8bit_multi_step_", backend="cuda", device="cuda")
def adam8bit_multi_step_(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps,
                         skipped, *hyper):  # fmt: skip
    _adam8bit_multi_step(_C.adam8bit_multi_step_cuda, params, grads, state1, state2, absmax1,
                         absmax2, qmap1, qmap2, steps, skipped, *hyper)  # fmt: skip


@register_kernel("adam8bit_step_", backend="cuda", device="cuda")
def adam8bit_step_(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped, *hyper):
    _adam8bit_multi_step(_C.adam8bit_multi_step_cuda, [p], [g], [state1], [state2], [absmax1],
                         [absmax2], qmap1, qmap2, [step], [skipped], *hyper)  # fmt: skip


# --------------------------------------------------------------------------- LLM.int8
# Row quantization and outlier columns only: int8_scaled_mm and int8_linear are not
# registered here, so the dispatcher runs the triton backend's GEMM for them.


@register_kernel("int8_quantize_weight", backend="cuda", device="cuda")
def int8_quantize_weight(W: torch.Tensor):
    return _int8_quantize_weight(_C.int8_quantize_weight_cuda, W)


@register_kernel("int8_vectorwise_quant", backend="cuda", device="cuda")
def int8_vectorwise_quant(A: torch.Tensor, threshold: float):
    A = A.contiguous()
    codes = empty(A.shape, torch.int8, A.device)
    row_absmax = empty((_rows(A),), torch.float32, A.device)
    mask = torch.empty(A.shape[-1], dtype=torch.uint8, device=A.device)
    _C.int8_vectorwise_quant_cuda(A, threshold, codes, row_absmax, mask)
    found = torch.nonzero(mask).view(-1)  # sorted; synchronizes: the count is data-dependent
    outlier_cols = empty(found.shape, torch.int64, A.device)
    outlier_cols.copy_(found)
    return codes, row_absmax, outlier_cols


# --------------------------------------------------------------------------- NF4 / FP4

# matmul_4bit dispatch rule: up to GEMV_MAX_ROWS rows of x (flattened to [rows, in]) the fused
# GEMV kernel (4-byte words of packed codes, a batch of them and their block scales loaded
# before any is decoded, codebooks in shared memory, fp32 accumulation, one to eight warps per
# output feature so that short weights still fill the GPU); above that the weight is
# dequantized into a temporary in x's dtype and multiplied by torch's GEMM (cuBLAS), as
# torchao does: at that batch the GEMM is compute-bound and the decode costs a fraction of it.
# That path's accuracy is F.linear's, under torch's matmul settings (functional.matmul_4bit).
GEMV_MAX_ROWS = _C.build_info()["constants"].get("cuda_gemv_4bit_max_rows", 0) if COMPILED else 0


@register_kernel("quantize_4bit", backend="cuda", device="cuda")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    return _quantize_4bit(_C.quantize_4bit_cuda, A, blocksize, quant_type)


@register_kernel("dequantize_4bit", backend="cuda", device="cuda")
def dequantize_4bit(A, absmax, code, blocksize, shape, dtype, *nested):
    return _dequantize_4bit(
        _C.dequantize_4bit_cuda, A, absmax, code, blocksize, shape, dtype, *nested
    )


@register_kernel("matmul_4bit", backend="cuda", device="cuda")
def matmul_4bit(
    x, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias
):
    out_features, in_features = shape
    rows = x.numel() // in_features
    if rows > GEMV_MAX_ROWS:
        W = dequantize_4bit(
            A, absmax, code, blocksize, shape, x.dtype, nested_absmax, nested_code, offset,
            nested_blocksize,
        )  # fmt: skip
        return torch.nn.functional.linear(x, W, None if bias is None else bias.to(x.dtype))
    out = empty((*x.shape[:-1], out_features), x.dtype, x.device)
    if rows == 0:
        return out
    weight = _weight_args(
        A, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize
    )
    bias32 = _float32_bias(bias)
    _C.matmul_4bit_gemv_cuda(
        x.reshape(rows, in_features).contiguous(), *weight, bias32, out.view(rows, out_features)
    )
    return out


@register_eager("matmul_4bit", backend="cuda", device="cuda")
def matmul_4bit_eager(
    x, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias
):
    """The GEMV case of the call above in one native step (``_C.matmul_4bit_eager_cuda``), or
    None for more rows or arguments it does not accept (the checked path then takes them)."""
    return _eager_or_none(
        _C.matmul_4bit_eager_cuda, x, A, absmax, code, blocksize, shape,
        nested_absmax, nested_code, offset, nested_blocksize, bias, GEMV_MAX_ROWS,
        poison(x.dtype),
    )  # fmt: skip


mark_available("cuda", COMPILED and torch.cuda.is_available())

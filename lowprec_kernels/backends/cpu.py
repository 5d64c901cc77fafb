"""The ``cpu`` backend: C++ kernels of ``lowprec_kernels._C`` registered for CPU tensors.

Each kernel has exactly its op's signature and receives validated arguments
(``lowprec_kernels/_ops.py``); it makes its inputs contiguous, allocates the outputs (through
``_alloc``, so tests can poison them) and calls the native function, which fills them. One
section per kernel family.
"""

from __future__ import annotations

import torch

from lowprec_kernels import _C
from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import mark_available, register_kernel
from lowprec_kernels._ops import num_blocks

# --------------------------------------------------------------------------- blockwise 8-bit


@register_kernel("quantize_blockwise", backend="cpu", device="cpu")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    A = A.contiguous()
    codes = empty(A.shape, torch.uint8, A.device)
    absmax = empty((num_blocks(A.numel(), blocksize),), torch.float32, A.device)
    _C.quantize_blockwise_cpu(A, code.contiguous(), blocksize, codes, absmax)
    return codes, absmax


@register_kernel("dequantize_blockwise", backend="cpu", device="cpu")
def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
):
    A = A.contiguous()
    out = empty(A.shape, dtype, A.device)
    _C.dequantize_blockwise_cpu(A, absmax.contiguous(), code.contiguous(), blocksize, out)
    return out


mark_available("cpu")

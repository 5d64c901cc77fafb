"""Blockwise 8-bit quantization: the definition every backend is checked against.

Per block of ``blocksize`` consecutive elements of the flattened tensor: ``absmax`` is the
block's largest magnitude (NaN if the block holds a NaN) and each element is encoded as the
index of the codebook entry nearest to ``x / absmax`` (``encode_thresholds``; an all-zero
block encodes as the index of 0.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels.reference.codebooks import encode_nearest, encode_thresholds


def blocks_of(x: torch.Tensor, blocksize: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` flattened and padded with ``fill`` to whole blocks: [nblocks, blocksize]."""
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    return F.pad(flat, (0, pad), value=fill).view(-1, blocksize)


def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Largest |x| of each row, float32, NaN when the row holds a NaN."""
    return blocks.float().abs().amax(dim=1)  # amax propagates NaN


def scale_to_unit(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``x / absmax`` per block in float32 (IEEE division); 0 where absmax is 0."""
    scale = absmax.unsqueeze(1)
    v = blocks.float() / torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.zeros_like(v), v)


@register_kernel("quantize_blockwise", "reference")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = A.numel()
    blocks = blocks_of(A, blocksize)
    absmax = block_absmax(blocks)
    idx = encode_nearest(scale_to_unit(blocks, absmax), encode_thresholds(code))
    codes = empty(A.shape, torch.uint8, A.device)
    codes.view(-1).copy_(idx.view(-1)[:n])
    out_absmax = empty(absmax.shape, torch.float32, A.device)
    out_absmax.copy_(absmax)
    return codes, out_absmax


@register_kernel("dequantize_blockwise", "reference")
def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
):
    n = A.numel()
    values = code[A.reshape(-1).long()]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    out = empty(A.shape, dtype, A.device)
    out.view(-1).copy_(values * scales)
    return out

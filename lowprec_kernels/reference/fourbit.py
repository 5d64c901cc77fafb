"""NF4 / FP4: 4-bit codes, blockwise absmax (optionally double-quantized). The definition.

Weight ``[out, in]`` is flattened row-major; element ``2i`` goes to the high nibble and
``2i+1`` to the low nibble of byte ``i`` (an odd count leaves the last low nibble 0); the
packed codes are ``uint8 [(n+1)//2, 1]``. Each block of ``blocksize`` elements has an fp32
absmax; with double quantization the absmax values minus their mean (``offset``) are stored
as blockwise 8-bit codes of the signed dynamic map (``nested_*``).
"""

from __future__ import annotations

import torch

from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels.reference.blockwise import block_absmax, blocks_of, scale_to_unit
from lowprec_kernels.reference.codebooks import (
    FP4_SIGN_BIT,
    code_4bit,
    encode_nearest,
    encode_thresholds,
)
from lowprec_kernels.reference.int8 import accumulate_dtype
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF


def encode_4bit(v: torch.Tensor, x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (int64) of unit-scaled values ``v``; ``x`` supplies FP4's sign."""
    code = code_4bit(quant_type, v.device)
    if quant_type == "nf4":
        return encode_nearest(v, encode_thresholds(code))
    # FP4: nearest magnitude among the 8 non-negative entries, then the sign bit of x.
    magnitudes, order = code[:FP4_SIGN_BIT].sort()
    idx = order[encode_nearest(v.abs(), encode_thresholds(magnitudes))]
    return torch.where(x < 0, idx | FP4_SIGN_BIT, idx)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat int codes -> uint8 [(n+1)//2, 1], even elements in the high nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).view(-1, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 packed codes -> int64 codes [n]."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n].long()


@register_kernel("quantize_4bit", "reference")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    blocks = blocks_of(A, blocksize)
    absmax = block_absmax(blocks)
    v = scale_to_unit(blocks, absmax)
    codes = encode_4bit(v.view(-1)[:n], A.reshape(-1).float(), quant_type)
    packed = empty(((n + 1) // 2, 1), torch.uint8, A.device)
    packed.copy_(pack_nibbles(codes))
    out_absmax = empty(absmax.shape, torch.float32, A.device)
    out_absmax.copy_(absmax)
    return packed, out_absmax


def decode_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize) -> torch.Tensor:
    """fp32 block scales: ``absmax`` itself, or ``nested_code[c] * nested_absmax + offset``."""
    if absmax.dtype == torch.float32:
        return absmax
    nb = absmax.numel()
    scales = nested_absmax.float().repeat_interleave(nested_blocksize)[:nb]
    return nested_code[absmax.reshape(-1).long()] * scales + offset.reshape(())


def dequantize_4bit_fp32(A, absmax, code, blocksize, shape, *nested) -> torch.Tensor:
    """The decoded weight in float32 with ``shape``."""
    n = 1
    for s in shape:
        n *= s
    scales = decode_absmax(absmax, *nested).repeat_interleave(blocksize)[:n]
    return (code[unpack_nibbles(A, n)] * scales).view(list(shape))


@register_kernel("dequantize_4bit", "reference")
def dequantize_4bit(A, absmax, code, blocksize, shape, dtype, *nested):
    out = empty(list(shape), dtype, A.device)
    out.copy_(dequantize_4bit_fp32(A, absmax, code, blocksize, shape, *nested))
    return out


@register_kernel("matmul_4bit", "reference")
def matmul_4bit(x, A, absmax, code, blocksize, shape, n_absmax, n_code, offset, n_bs, bias):
    # Computed once, exactly as far as the accumulate dtype allows, then rounded to x's dtype.
    acc = accumulate_dtype(x.device)
    W = dequantize_4bit_fp32(A, absmax, code, blocksize, shape, n_absmax, n_code, offset, n_bs)
    y = x.reshape(-1, x.shape[-1]).to(acc) @ W.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    out = empty((*x.shape[:-1], shape[0]), x.dtype, x.device)
    out.view(-1, shape[0]).copy_(y)
    return out


# --- the error every backend's matmul_4bit must stay within (tests and GPU checks) ----------


def matmul_4bit_float64(x: torch.Tensor, W64: torch.Tensor, bias: torch.Tensor | None):
    """(y64, scale): x @ W64.T + bias in float64 and |x| @ |W64|.T + |bias|, the sum of
    magnitudes that bounds every rounding error; W64 is the fp32 decoded weight in float64.
    Both shaped like the op's output."""
    x64 = x.double().reshape(-1, x.shape[-1])
    y64 = x64 @ W64.T
    scale = x64.abs() @ W64.abs().T
    if bias is not None:
        y64 = y64 + bias.double()
        scale = scale + bias.double().abs()
    return y64.reshape(*x.shape[:-1], -1), scale.reshape(*x.shape[:-1], -1)


def matmul_4bit_error_excess(
    y: torch.Tensor, y64: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, in_features: int
) -> torch.Tensor:
    """|y - y64| minus what a correct matmul_4bit with x of ``dtype`` may err by, per element
    (<= 0: within).

    The bound is u_out |y64| + (u_w + (K + 2) 2**-24) scale (+ fp16 subnormal terms):
    * u_out: the result is rounded once into y's dtype (x's);
    * u_w: a backend may round the decoded weights into the compute dtype before the
      products (0 for fp32: the fp32 weights are exact there);
    * (K + 2) 2**-24: the K products and the bias are summed in fp32 (every backend
      accumulates in fp32, whatever order or FMA use); recursive summation of K + 1 terms
      errs by at most (K + 1) u32 relative to the sum of magnitudes, one more for products
      that are not exact;
    * fp16: weights or results below its normal range round with absolute error <= 2**-25.
    """
    u_out = UNIT_ROUNDOFF[dtype]
    u_w = 0.0 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    bound = u_out * y64.abs() + (u_w + (in_features + 2) * UNIT_ROUNDOFF[torch.float32]) * scale
    if dtype == torch.float16:
        bound = bound + 2.0**-25 * (1 + scale)
    return (y.double().reshape(y64.shape) - y64).abs() - bound

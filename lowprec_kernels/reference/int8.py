"""LLM.int8: per-row int8 codes, outlier columns in 16-bit. The definition backends match.

Codes are ``rint(x * (127 / absmax))`` in float32 with the row's absmax (half to even; the
scale one IEEE division, where bitsandbytes' ``127.0 / row_stats``, evaluated by torch as a
reciprocal times 127, rounds twice: its codes can differ from ours by one at exact ties, 65
of the 2,097,152 codes of a 4096 x 512 fp16 weight), clamped to ±127; an element whose code is
not a number (a zero, NaN or infinite absmax) gets code 0. Below 127 / FLT_MAX (about
3.7e-37) the scale overflows to inf, so every nonzero element of such a row codes as ±127
(its sign only), on every backend. Products are then summed exactly
(int32 on the kernels, float64 here; rows of more than ``_ops.INT8_INT32_EXACT_MAX_K``
columns, whose int32 sums could overflow, always run here) and scaled by
``row_stat * col_stat / 127**2``.

Non-finite activations: NaN is never an outlier (``|NaN| >= threshold`` is false), so a row
holding a NaN gets a NaN absmax and its output row is NaN; an infinite value is an outlier
whenever threshold > 0, so it reaches its output row through the 16-bit term (inf or NaN);
with threshold 0 an infinite value gives its row an infinite absmax and a NaN output row.
Nothing non-finite is ever silently dropped.
"""

from __future__ import annotations

import torch

from lowprec_kernels._alloc import empty
from lowprec_kernels._dispatch import register_kernel

INT8_SCALE = 127.0  # the largest code magnitude; the one definition of "127" in the library


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (exact for int8 products), float32 elsewhere."""
    return torch.float32 if device.type == "mps" else torch.float64


def int8_dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, dtype) -> torch.Tensor:
    """``W_deq = weight * weight_scale / 127`` per output row, in ``dtype``."""
    return (weight.float() * (weight_scale.unsqueeze(1) / INT8_SCALE)).to(dtype)


def encode_rows(X: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """int8 codes of float32 rows ``X`` [rows, cols] given each row's absmax."""
    # One float32 IEEE division per row (inf when absmax == 0). Spelled tensor / tensor on
    # purpose: torch evaluates `number / tensor` as reciprocal(tensor) * number, which rounds
    # twice and differs at ties.
    scale = torch.full_like(absmax, INT8_SCALE).unsqueeze(1) / absmax.unsqueeze(1)
    q = torch.round(X * scale)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    return q.clamp_(-INT8_SCALE, INT8_SCALE).to(torch.int8)


@register_kernel("int8_quantize_weight", "reference")
def int8_quantize_weight(W: torch.Tensor):
    Wf = W.float()
    absmax = Wf.abs().amax(dim=1)
    q = empty(W.shape, torch.int8, W.device)
    q.copy_(encode_rows(Wf, absmax))
    scale = empty(absmax.shape, torch.float32, W.device)
    scale.copy_(absmax)
    return q, scale


def outlier_columns(X: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted int64 indices of the columns holding any ``|x| >= threshold`` (none if 0)."""
    if threshold <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=X.device)
    return torch.nonzero((X.abs() >= threshold).any(dim=0)).view(-1)


@register_kernel("int8_vectorwise_quant", "reference")
def int8_vectorwise_quant(A: torch.Tensor, threshold: float):
    X = A.reshape(-1, A.shape[-1]).float()
    cols = outlier_columns(X, threshold)
    if cols.numel():
        X = X.index_fill(1, cols, 0.0)
    absmax = X.abs().amax(dim=1)
    q = empty(A.shape, torch.int8, A.device)
    q.view(-1, A.shape[-1]).copy_(encode_rows(X, absmax))
    row_stats = empty(absmax.shape, torch.float32, A.device)
    row_stats.copy_(absmax)
    out_cols = empty(cols.shape, torch.int64, A.device)
    out_cols.copy_(cols)
    return q, row_stats, out_cols


def _scaled_product(A, row_stats, weight, weight_scale) -> torch.Tensor:
    """``(A @ weight.T) * row_stats * weight_scale / 127**2`` in the accumulate dtype."""
    acc_dtype = accumulate_dtype(A.device)
    acc = A.reshape(-1, A.shape[-1]).to(acc_dtype) @ weight.to(acc_dtype).T
    scale = row_stats.to(acc_dtype).reshape(-1, 1) * weight_scale.to(acc_dtype).unsqueeze(0)
    return acc * scale / (INT8_SCALE * INT8_SCALE)


def _finish(y: torch.Tensor, bias, lead_shape, dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    out = empty((*lead_shape, y.shape[-1]), dtype, y.device)
    out.view(-1, y.shape[-1]).copy_(y)
    return out


@register_kernel("int8_scaled_mm", "reference")
def int8_scaled_mm(A, row_stats, weight, weight_scale, bias, dtype):
    y = _scaled_product(A, row_stats, weight, weight_scale)
    return _finish(y, bias, A.shape[:-1], dtype)


@register_kernel("int8_linear", "reference")
def int8_linear(x, weight, weight_scale, bias, threshold):
    xq, row_stats, cols = int8_vectorwise_quant(x, threshold)
    y = _scaled_product(xq, row_stats, weight, weight_scale)
    if cols.numel():
        # The outlier columns, exactly as given, against the dequantized weight columns.
        x_out = x.reshape(-1, x.shape[-1]).index_select(1, cols).to(y.dtype)
        w_out = int8_dequantize_weight(weight.index_select(1, cols), weight_scale, y.dtype)
        y = y + x_out @ w_out.T
    return _finish(y, bias, x.shape[:-1], x.dtype)

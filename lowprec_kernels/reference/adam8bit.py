"""The 8-bit Adam / AdamW step: the definition every backend's fused kernel matches.

State: ``m`` as blockwise 8-bit codes of the signed dynamic map (``state1``, ``absmax1``),
``v`` of the unsigned map (``state2``, ``absmax2``). One step, per element, in float32:

    g = g * gnorm_scale;  Adam (not decoupled): g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    AdamW (decoupled): p = p * (1 - lr * weight_decay)
    denom = sqrt(v) * inv_sqrt_bc2 + eps
    p = p - step_size * (m / denom)

with ``t`` the step count after this step, ``step_size = lr / (1 - beta1**t)`` and
``inv_sqrt_bc2 = 1 / sqrt(1 - beta2**t)`` (``update_scalars``). This is
``p - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)`` of ARCHITECTURE §4 with
the bias corrections folded into two per-tensor scalars, as ``torch.optim.AdamW`` folds them:
per element one division and one square root instead of three divisions and a square root.

Rounding: every scalar coefficient (``beta1``, ``1 - beta1``, ``1 - lr * weight_decay``,
``step_size``, ``inv_sqrt_bc2``, ...) is computed in float64 (IEEE ``pow``, division and
square root) and rounded to float32 once; the per-element arithmetic is float32, one
rounding per operation, in the order written (``sqrt(v)`` correctly rounded, see
``ieee_sqrt``; no fused multiply-add). ``(1 - beta2) * g * g`` is ``((1 - beta2) * g) * g``, as
torch's ``addcmul_`` computes it: squaring first would overflow float32 for |g| above ~1.8e19
instead of ~5.8e20 (beta2 = 0.999), and an infinite v makes its whole block's codes NaN
(0 * inf on the next decode). ``m`` and ``v`` are then requantized with fresh block
absmax values (``quantize_blockwise``'s exact nearest rule).

A gradient holding any non-finite value skips the step for that tensor: ``p``, the states
and ``step`` stay unchanged and ``skipped`` is incremented by one.
"""

from __future__ import annotations

import math

import torch

from lowprec_kernels._dispatch import register_kernel
from lowprec_kernels.reference.blockwise import dequantize_blockwise, quantize_blockwise


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """``(1 - beta1**step, 1 - beta2**step)`` in float64 (kernels round them to float32)."""
    return 1.0 - beta1**step, 1.0 - beta2**step


def update_scalars(lr, beta1, beta2, step):
    """``(step_size, inv_sqrt_bc2) = (lr / (1 - beta1**t), 1 / sqrt(1 - beta2**t))`` in float64
    (kernels round each to float32 once). ``step`` is a Python number or a float64 tensor
    (then torch's float64 ops, which are IEEE: division, ``sqrt``, ``reciprocal``)."""
    bc1, bc2 = bias_corrections(beta1, beta2, step)
    if isinstance(bc2, torch.Tensor):
        return lr / bc1, torch.sqrt(bc2).reciprocal()
    return lr / bc1, 1.0 / math.sqrt(bc2)


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root.

    ``torch.sqrt`` of float32 on CPU is not (its vectorized path is off by one ulp for about
    a fifth of inputs here). The square root of a float32 taken in float64 and rounded once
    to float32 is exactly the correctly rounded result (53 >= 2 * 24 + 2 bits), which is
    what every backend's kernel computes.
    """
    return torch.sqrt(x.double()).float()


def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, step):
    """One Adam/AdamW update of float32 tensors; returns the new ``(p, m, v)``."""
    step_size, inv_sqrt_bc2 = update_scalars(lr, beta1, beta2, step)
    return adam_update_corrected(
        p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, step_size,
        inv_sqrt_bc2,
    )  # fmt: skip


def adam_update_corrected(
    p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, step_size,
    inv_sqrt_bc2,
):  # fmt: skip
    """``adam_update`` with ``update_scalars`` given: Python floats (float64, rounded to
    float32 by torch when they meet a float32 tensor), or float32 tensors broadcasting against
    ``m`` (the same values rounded once, e.g. computed on the device from step tensors)."""
    g = g * gnorm_scale
    if not decoupled and weight_decay != 0.0:
        g = g + weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    if decoupled and weight_decay != 0.0:
        p = p * (1.0 - lr * weight_decay)
    denom = ieee_sqrt(v) * inv_sqrt_bc2 + eps
    p = p - step_size * (m / denom)
    return p, m, v


def step_counts(op: str, steps) -> list[int]:
    """t = int(step) + 1 for each step tensor, all read before anything is updated: a step
    must be a finite number >= 0 (the kernels that read it on the host check the same; a
    negative or NaN one made every parameter NaN)."""
    counts = []
    for i, step in enumerate(steps):
        value = step.item()
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"lowprec.{op}: step of tensor {i} must be a finite number >= 0, "
                             f"got {value}")  # fmt: skip
        counts.append(int(value) + 1)
    return counts


@register_kernel("adam8bit_step_", "reference")
def adam8bit_step_(
    p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, blocksize, t=None,
):  # fmt: skip
    if t is None:
        (t,) = step_counts("adam8bit_step_", [step])
    if not bool(torch.isfinite(g).all()):
        skipped.add_(1)
        return
    # Element by element in memory order: the states need only p's number of elements.
    f32 = torch.float32
    m = dequantize_blockwise(state1.reshape(-1), absmax1.reshape(-1), qmap1, blocksize, f32)
    v = dequantize_blockwise(state2.reshape(-1), absmax2.reshape(-1), qmap2, blocksize, f32)
    p32, m, v = adam_update(
        p.float().reshape(-1), g.float().reshape(-1), m, v, lr, beta1, beta2, eps,
        weight_decay, decoupled, gnorm_scale, t,
    )  # fmt: skip
    codes1, new_absmax1 = quantize_blockwise(m, qmap1, blocksize)
    codes2, new_absmax2 = quantize_blockwise(v, qmap2, blocksize)
    p.copy_(p32.view(p.shape))
    state1.copy_(codes1.view(state1.shape))
    state2.copy_(codes2.view(state2.shape))
    absmax1.copy_(new_absmax1.view(absmax1.shape))
    absmax2.copy_(new_absmax2.view(absmax2.shape))
    step.fill_(float(t))  # (an int past int64 does not convert)


@register_kernel("adam8bit_multi_step_", "reference")
def adam8bit_multi_step_(
    params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, skipped, *hyper
):  # fmt: skip
    counts = step_counts("adam8bit_multi_step_", steps)
    for p, g, s1, s2, a1, a2, step, skip, t in zip(
        params, grads, state1, state2, absmax1, absmax2, steps, skipped, counts
    ):
        adam8bit_step_(p, g, s1, s2, a1, a2, qmap1, qmap2, step, skip, *hyper, t=t)


@register_kernel("adam_multi_step_", "reference")
def adam_multi_step_(
    params, grads, exp_avgs, exp_avg_sqs, steps, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale,
):  # fmt: skip
    """The same step with float32 states ``exp_avgs`` (m) and ``exp_avg_sqs`` (v), updated in
    place: the update of ``adam8bit_step_`` without the quantization, and its skip rule."""
    counts = step_counts("adam_multi_step_", steps)
    for p, g, m, v, step, skip, t in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, skipped, counts
    ):
        if not bool(torch.isfinite(g).all()):
            skip.add_(1)
            continue
        # Element by element in memory order: the states need only p's number of elements.
        p32, new_m, new_v = adam_update(
            p.float().reshape(-1), g.float().reshape(-1), m.reshape(-1), v.reshape(-1), lr,
            beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, t,
        )  # fmt: skip
        p.copy_(p32.view(p.shape))
        m.copy_(new_m.view(m.shape))
        v.copy_(new_v.view(v.shape))
        step.fill_(float(t))

"""Every ``torch.ops.lowprec`` op: its schema, its argument checks and its fake implementation.

This file is the single source of truth for signatures and validation. Each op is defined
once here with

* a *checker* that raises ``TypeError``/``ValueError`` naming the bad argument and what was
  expected; it runs in the fake implementation (meta/compile) and in eager mode before any
  backend kernel, so no backend repeats it;
* a *fake* implementation giving output shapes and dtypes (``torch.compile``, meta tensors);
* one *router* kernel (``CompositeExplicitAutograd``, so every device) that runs the checker
  and calls the kernel of the active backend (``_dispatch.kernel_for``).

``call`` runs an op from the user-facing functions: through ``torch.ops.lowprec``, or, for a
plain eager call that nothing in torch's dispatcher would act on, straight through the
router (see ``_dispatcher_has_work``).

Backend kernels (``reference/``, ``backends/``) register against the op names below and can
assume validated arguments. One rule needs values the checker cannot read (under
``torch.compile`` they do not exist yet): an Adam step count must be finite and >= 0. The
kernels that read it on the host check it there (``reference.adam8bit.step_counts``, and
the C++ ``check_step_values``), before writing anything; GPU kernels keep it on the device.
(The native eager entries' C++ predicates mirror this file's checks as a yes or no.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import List  # noqa: UP035 - see TensorList

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from lowprec_kernels._dispatch import eager_for, kernel_for, reference_kernel
from lowprec_kernels.reference.codebooks import QUANT_TYPES_4BIT
from lowprec_kernels.reference.int8 import INT8_SCALE

_LIB = torch.library.Library("lowprec", "DEF")  # noqa: TOR901 - the namespace is ours alone

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES_8BIT = tuple(2**k for k in range(6, 13))  # 64 .. 4096
BLOCKSIZES_4BIT = tuple(2**k for k in range(5, 13))  # 32 .. 4096
NESTED_BLOCKSIZES = BLOCKSIZES_8BIT
CODEBOOK_SIZE_8BIT = 256
CODEBOOK_SIZE_4BIT = 16


# --------------------------------------------------------------------------- checks


def _fail(exc: type[Exception], op: str, msg: str) -> None:
    raise exc(f"lowprec.{op}: {msg}")


def _check_tensor(op: str, name: str, t, dtypes: Sequence[torch.dtype] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(TypeError, op, f"{name} must have dtype in ({names}), got {t.dtype}")


def _check_nonempty(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        _fail(ValueError, op, f"{name} must not be empty (got shape {tuple(t.shape)})")


def _check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            _fail(
                ValueError,
                op,
                f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}",
            )


def _check_numel(op: str, name: str, t: torch.Tensor, expected: int, why: str) -> None:
    if t.numel() != expected:
        _fail(ValueError, op, f"{name} must have {expected} elements ({why}), got {t.numel()}")


def _check_vector(op: str, name: str, t: torch.Tensor, expected: int, why: str) -> None:
    """A 1-D tensor of ``expected`` elements: per-block scales, whose order a 2-D layout (a
    transposed one, say) would change without changing their count."""
    if t.dim() != 1 or t.numel() != expected:
        _fail(ValueError, op, f"{name} must be 1-D of {expected} elements ({why}), got shape "
              f"{tuple(t.shape)}")  # fmt: skip


def int_argument(op: str, name: str, value):
    """An integer argument of the functional API as an int: Python and NumPy integers (a
    traced SymInt as it is); TypeError naming it for a bool, a float (64.0 == 64 would pass a
    membership test) or a tensor."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(TypeError, op, f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_choice(op: str, name: str, value, allowed: Sequence) -> None:
    if isinstance(allowed[0], int) and (
        isinstance(value, bool) or not isinstance(value, (int, torch.SymInt))
    ):
        # 64.0 == 64, so membership alone would let a float (or a tensor) through to kernels
        # that index with it (the ops' schemas, bypassed on the eager path, say int).
        _fail(TypeError, op, f"{name} must be an int, one of {tuple(allowed)}, got "
                             f"{type(value).__name__} {value!r}")  # fmt: skip
    if value not in allowed:
        _fail(ValueError, op, f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_codebook(op: str, name: str, code: torch.Tensor, size: int) -> None:
    _check_tensor(op, name, code, (torch.float32,))
    # (Sorted ascending, as every codebook of the formats is; not checked, which would read
    # the values: an unsorted one gives codes that are not the nearest.)
    _check_vector(op, name, code, size, f"a float32 codebook of {size} entries")


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def check_quantize_blockwise(A, code, blocksize, op="quantize_blockwise") -> None:
    _check_tensor(op, "A", A, FLOAT_DTYPES)
    _check_nonempty(op, "A", A)
    _check_codebook(op, "code", code, CODEBOOK_SIZE_8BIT)
    _check_same_device(op, "A", A, code=code)
    _check_choice(op, "blocksize", blocksize, BLOCKSIZES_8BIT)


def check_dequantize_blockwise(A, absmax, code, blocksize, dtype, op="dequantize_blockwise"):
    _check_tensor(op, "A", A, (torch.uint8,))
    _check_nonempty(op, "A", A)
    _check_tensor(op, "absmax", absmax, (torch.float32,))
    _check_codebook(op, "code", code, CODEBOOK_SIZE_8BIT)
    _check_same_device(op, "A", A, absmax=absmax, code=code)
    _check_choice(op, "blocksize", blocksize, BLOCKSIZES_8BIT)
    _check_choice(op, "dtype", dtype, FLOAT_DTYPES)
    _check_numel(
        op, "absmax", absmax, num_blocks(A.numel(), blocksize), f"one per block of {blocksize}"
    )


def check_quantize_4bit(A, blocksize, quant_type, op="quantize_4bit") -> None:
    _check_tensor(op, "A", A, FLOAT_DTYPES)
    _check_nonempty(op, "A", A)
    _check_choice(op, "blocksize", blocksize, BLOCKSIZES_4BIT)
    _check_choice(op, "quant_type", quant_type, QUANT_TYPES_4BIT)


def check_4bit_weight(
    op, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize
) -> int:
    """Checks a packed 4-bit weight and its (possibly double-quantized) scales; returns n."""
    _check_tensor(op, "A", A, (torch.uint8,))
    if any(s <= 0 for s in shape):  # [] is a 0-dim tensor's shape: one element
        _fail(ValueError, op, f"shape must be a list of positive sizes, got {shape}")
    n = math.prod(shape)
    _check_numel(op, "A", A, (n + 1) // 2, f"two 4-bit codes per byte for shape {list(shape)}")
    _check_choice(op, "blocksize", blocksize, BLOCKSIZES_4BIT)
    _check_codebook(op, "code", code, CODEBOOK_SIZE_4BIT)
    nb = num_blocks(n, blocksize)
    nested = (nested_absmax, nested_code, offset)
    if absmax is not None and isinstance(absmax, torch.Tensor) and absmax.dtype == torch.uint8:
        if any(t is None for t in nested):
            _fail(
                ValueError,
                op,
                "a uint8 (double-quantized) absmax needs nested_absmax, nested_code and offset",
            )
        _check_tensor(op, "nested_absmax", nested_absmax, (torch.float32,))
        _check_codebook(op, "nested_code", nested_code, CODEBOOK_SIZE_8BIT)
        _check_tensor(op, "offset", offset, (torch.float32,))
        _check_numel(op, "offset", offset, 1, "one float32 scalar")
        _check_choice(op, "nested_blocksize", nested_blocksize, NESTED_BLOCKSIZES)
        _check_vector(
            op,
            "nested_absmax",
            nested_absmax,
            num_blocks(nb, nested_blocksize),
            f"one per block of {nested_blocksize} absmax codes",
        )
    else:
        _check_tensor(op, "absmax", absmax, (torch.float32, torch.uint8))
        if any(t is not None for t in nested):
            _fail(
                ValueError,
                op,
                "nested_absmax/nested_code/offset given but absmax is float32 (not double-quantized)",
            )
    _check_vector(op, "absmax", absmax, nb, f"one per block of {blocksize} for shape {list(shape)}")
    _check_same_device(
        op, "A", A, absmax=absmax, code=code, nested_absmax=nested_absmax, nested_code=nested_code,
        offset=offset,
    )  # fmt: skip
    return n


def check_dequantize_4bit(
    A, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, offset, nested_blocksize
):
    op = "dequantize_4bit"
    check_4bit_weight(
        op, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize
    )
    _check_choice(op, "dtype", dtype, FLOAT_DTYPES)


def _check_linear_input(op, x, in_features, weight_device_name, weight, bias, out_features):
    _check_tensor(op, "x", x, FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] != in_features:
        _fail(
            ValueError,
            op,
            f"x must have last dimension in_features={in_features}, got shape {tuple(x.shape)}",
        )
    _check_same_device(op, weight_device_name, weight, x=x, bias=bias)
    _check_bias(op, bias, out_features)


def _check_bias(op: str, bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None:
        _check_tensor(op, "bias", bias, FLOAT_DTYPES)
        if bias.dim() != 1 or bias.shape[0] != out_features:
            _fail(
                ValueError,
                op,
                f"bias must have shape ({out_features},) (one per output feature), "
                f"got {tuple(bias.shape)}",
            )


def check_matmul_4bit(
    x, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias
):
    op = "matmul_4bit"
    check_4bit_weight(
        op, A, absmax, code, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize
    )
    if len(shape) != 2:
        _fail(ValueError, op, f"shape must be the 2-D weight shape [out, in], got {list(shape)}")
    _check_linear_input(op, x, shape[1], "A", A, bias, shape[0])


def check_int8_quantize_weight(W, op="int8_quantize_weight"):
    _check_tensor(op, "W", W, FLOAT_DTYPES)
    if W.dim() != 2:
        _fail(ValueError, op, f"W must be 2-D [out_features, in_features], got {W.dim()}-D")
    _check_nonempty(op, "W", W)


# The largest positive threshold that float32, in which every kernel compares, rounds to 0.
_THRESHOLD_ROUNDS_TO_ZERO = 2.0**-150


def threshold_value(op: str, threshold) -> float:
    """The LLM.int8 ``threshold`` argument as a float; TypeError naming it when it is not a
    number (a string such as "6" included: float() would take it)."""
    if not isinstance(threshold, (str, bytes)):
        try:
            return float(threshold)
        except (TypeError, ValueError):
            pass
    _fail(TypeError, op, f"threshold must be a number, got {type(threshold).__name__} "
                         f"{threshold!r}")  # fmt: skip


def _check_threshold(op, threshold):
    threshold = threshold_value(op, threshold)
    if not (threshold >= 0.0 and math.isfinite(threshold)):
        _fail(
            ValueError,
            op,
            f"threshold must be a finite number >= 0 (0 = no outliers), got {threshold}",
        )
    if 0.0 < threshold <= _THRESHOLD_ROUNDS_TO_ZERO:
        # In float32 it is 0: "no outliers" to the native kernels, "every column" (|x| >= 0)
        # to a comparison; neither is what a positive threshold asks for.
        _fail(
            ValueError,
            op,
            f"threshold must be 0 (no outliers) or above {_THRESHOLD_ROUNDS_TO_ZERO:.3g}, which "
            f"float32 rounds to 0; got {threshold}",
        )


def check_int8_vectorwise_quant(A, threshold, op="int8_vectorwise_quant"):
    _check_tensor(op, "A", A, FLOAT_DTYPES)
    if A.dim() == 0:
        _fail(ValueError, op, "A must have at least one dimension (features last)")
    if A.shape[-1] == 0:  # (no rows is fine: a batch an MoE expert got no tokens of)
        _fail(ValueError, op, f"A must have at least one feature, got shape {tuple(A.shape)}")
    _check_threshold(op, threshold)


def _check_int8_weight(op, weight, weight_scale):
    _check_tensor(op, "weight", weight, (torch.int8,))
    _check_nonempty(op, "weight", weight)
    if weight.dim() != 2:
        _fail(
            ValueError,
            op,
            f"weight must be 2-D int8 [out_features, in_features], got {weight.dim()}-D",
        )
    _check_tensor(op, "weight_scale", weight_scale, (torch.float32,))
    if weight_scale.dim() != 1 or weight_scale.shape[0] != weight.shape[0]:
        _fail(
            ValueError,
            op,
            f"weight_scale must have shape ({weight.shape[0]},) (one per output row), "
            f"got {tuple(weight_scale.shape)}",
        )
    _check_same_device(op, "weight", weight, weight_scale=weight_scale)


def check_int8_scaled_mm(A, row_stats, weight, weight_scale, bias, dtype):
    op = "int8_scaled_mm"
    _check_int8_weight(op, weight, weight_scale)
    _check_tensor(op, "A", A, (torch.int8,))
    if A.dim() == 0 or A.shape[-1] != weight.shape[1]:
        _fail(
            ValueError,
            op,
            f"A must have last dimension in_features={weight.shape[1]}, got shape {tuple(A.shape)}",
        )
    _check_tensor(op, "row_stats", row_stats, (torch.float32,))
    rows = A.numel() // A.shape[-1] if A.shape[-1] else 0
    if row_stats.shape not in ((rows,), A.shape[:-1]):  # ours, or bitsandbytes' A.shape[:-1]
        _fail(ValueError, op, f"row_stats must have shape ({rows},) or {tuple(A.shape[:-1])} "
              f"(one per row of A), got {tuple(row_stats.shape)}")  # fmt: skip
    _check_choice(op, "dtype", dtype, FLOAT_DTYPES)
    _check_same_device(op, "weight", weight, A=A, row_stats=row_stats, bias=bias)
    _check_bias(op, bias, weight.shape[0])


def check_int8_linear(x, weight, weight_scale, bias, threshold):
    op = "int8_linear"
    _check_int8_weight(op, weight, weight_scale)
    _check_linear_input(op, x, weight.shape[1], "weight", weight, bias, weight.shape[0])
    _check_threshold(op, threshold)


def _check_adam8bit_tensors(op, p, g, state1, state2, absmax1, absmax2, step, skipped, blocksize):
    """The checks of one parameter's tensors (not their devices), given a valid blocksize."""
    _check_adam_parameter(op, p, g)
    nb = num_blocks(p.numel(), blocksize)
    for name, t in (("state1", state1), ("state2", state2)):
        _check_tensor(op, name, t, (torch.uint8,))
        _check_numel(op, name, t, p.numel(), "one 8-bit code per parameter")
        if not t.is_contiguous():
            _fail(ValueError, op, f"{name} must be contiguous (it is updated in place)")
    for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        _check_tensor(op, name, t, (torch.float32,))
        _check_numel(op, name, t, nb, f"one per block of {blocksize}")
    _check_adam_counters(op, step, skipped)


def _check_adam_parameter(op, p, g) -> None:
    _check_tensor(op, "p", p, FLOAT_DTYPES)
    _check_nonempty(op, "p", p)
    _check_tensor(op, "g", g, (p.dtype,))
    if g.shape != p.shape:
        _fail(ValueError, op, f"g must have p's shape {tuple(p.shape)}, got {tuple(g.shape)}")
    if not p.is_contiguous():
        _fail(ValueError, op, "p must be contiguous (it is updated in place)")


def _check_adam_counters(op, step, skipped) -> None:
    _check_tensor(op, "step", step, (torch.float32,))
    _check_numel(op, "step", step, 1, "the step count as a float32 scalar tensor")
    _check_tensor(op, "skipped", skipped, (torch.float32,))
    _check_numel(op, "skipped", skipped, 1, "the count of skipped steps as a float32 scalar tensor")


def _check_adam_float_state_tensors(op, p, g, exp_avg, exp_avg_sq, step, skipped):
    """The checks of one parameter's tensors with float32 states (not their devices)."""
    _check_adam_parameter(op, p, g)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_tensor(op, name, t, (torch.float32,))
        _check_numel(op, name, t, p.numel(), "one float32 per parameter")
        if not t.is_contiguous():
            _fail(ValueError, op, f"{name} must be contiguous (it is updated in place)")
    _check_adam_counters(op, step, skipped)


def _check_adam_lists(op, params, lists: dict) -> None:
    if len(params) == 0:
        _fail(ValueError, op, "params must hold at least one tensor")
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            _fail(
                ValueError,
                op,
                f"{name} must hold {len(params)} tensors (one per param), got {len(tensors)}",
            )


def _check_adam_scalars(op, lr, beta1, beta2, eps, weight_decay, gnorm_scale) -> None:
    # (Written so that a NaN fails every test.) lr, weight_decay and gnorm_scale multiply the
    # update after the gradient's finiteness check: an infinite one would reach p and the
    # states unnoticed.
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("gnorm_scale", gnorm_scale)):
        if not 0.0 <= value < math.inf:
            _fail(ValueError, op, f"{name} must be finite and >= 0, got {value}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            _fail(ValueError, op, f"{name} must be in [0, 1), got {b}")
    if not eps >= 0.0:
        _fail(ValueError, op, f"eps must be >= 0, got {eps}")


def check_adam8bit_step(
    p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, blocksize, *, op="adam8bit_step_",
):  # fmt: skip
    _check_choice(op, "blocksize", blocksize, BLOCKSIZES_8BIT)
    _check_adam8bit_tensors(op, p, g, state1, state2, absmax1, absmax2, step, skipped, blocksize)
    _check_codebook(op, "qmap1", qmap1, CODEBOOK_SIZE_8BIT)
    _check_codebook(op, "qmap2", qmap2, CODEBOOK_SIZE_8BIT)
    _check_adam_scalars(op, lr, beta1, beta2, eps, weight_decay, gnorm_scale)
    _check_same_device(
        op, "p", p, g=g, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2,
        qmap1=qmap1, qmap2=qmap2, step=step, skipped=skipped,
    )  # fmt: skip


def _adam8bit_tensors_pass(p, g, state1, state2, absmax1, absmax2, step, skipped, blocksize,
                           device) -> bool:  # fmt: skip
    """Whether one parameter's tensors pass _check_adam8bit_tensors and all lie on ``device``:
    the same conditions in one expression, ~4x faster, so that a step over hundreds of
    tensors checks each with this and runs the checks that name the argument only when it
    fails (tests/test_ops.py feeds it every bad input of adam8bit_step_)."""
    T = torch.Tensor
    if not (isinstance(p, T) and isinstance(g, T) and isinstance(state1, T)
            and isinstance(state2, T) and isinstance(absmax1, T) and isinstance(absmax2, T)
            and isinstance(step, T) and isinstance(skipped, T)):  # fmt: skip
        return False
    n = p.numel()
    nb = -(-n // blocksize)
    u8, f32 = torch.uint8, torch.float32
    return (
        _adam_parameter_pass(p, g, step, skipped, device)
        and state1.dtype == u8 and state1.numel() == n and state1.is_contiguous()
        and state2.dtype == u8 and state2.numel() == n and state2.is_contiguous()
        and absmax1.dtype == f32 and absmax1.numel() == nb
        and absmax2.dtype == f32 and absmax2.numel() == nb
        and state1.device == device and state2.device == device and absmax1.device == device
        and absmax2.device == device
    )  # fmt: skip


def _adam_parameter_pass(p, g, step, skipped, device) -> bool:
    """The conditions on p, g and the counters that both multi-steps' screens share, given
    tensors: _check_adam_parameter and _check_adam_counters, and all on ``device``."""
    f32 = torch.float32
    return (
        p.dtype in FLOAT_DTYPES and p.numel() > 0 and g.dtype == p.dtype and g.shape == p.shape
        and p.is_contiguous()
        and step.dtype == f32 and step.numel() == 1
        and skipped.dtype == f32 and skipped.numel() == 1
        and p.device == device and g.device == device and step.device == device
        and skipped.device == device
    )  # fmt: skip


def check_adam8bit_multi_step(
    params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale, blocksize,
):  # fmt: skip
    op = "adam8bit_multi_step_"
    lists = dict(
        params=params, grads=grads, state1=state1, state2=state2, absmax1=absmax1,
        absmax2=absmax2, steps=steps, skipped=skipped,
    )  # fmt: skip
    _check_adam_lists(op, params, lists)
    # What every tensor shares, once: the blocksize, the maps, the scalars, the device.
    _check_choice(op, "blocksize", blocksize, BLOCKSIZES_8BIT)
    _check_tensor(op, "params[0]", params[0])
    _check_codebook(op, "qmap1", qmap1, CODEBOOK_SIZE_8BIT)
    _check_codebook(op, "qmap2", qmap2, CODEBOOK_SIZE_8BIT)
    _check_adam_scalars(op, lr, beta1, beta2, eps, weight_decay, gnorm_scale)
    _check_same_device(op, "params[0]", params[0], qmap1=qmap1, qmap2=qmap2)
    device = params[0].device
    for i, per_tensor in enumerate(zip(*lists.values())):
        if not _adam8bit_tensors_pass(*per_tensor, blocksize, device):
            p, g, s1, s2, a1, a2, step, skip = per_tensor
            where = f"{op}: tensor {i}"
            _check_adam8bit_tensors(where, p, g, s1, s2, a1, a2, step, skip, blocksize)
            _check_same_device(
                where, "p", p, g=g, state1=s1, state2=s2, absmax1=a1, absmax2=a2, step=step,
                skipped=skip,
            )  # fmt: skip
            _check_same_device(op, "params[0]", params[0], **{f"params[{i}]": p})
            raise AssertionError(f"{where}: _adam8bit_tensors_pass and the checks disagree")


def _adam_float_state_tensors_pass(p, g, exp_avg, exp_avg_sq, step, skipped, device) -> bool:
    """_adam8bit_tensors_pass for float32 states: whether one parameter's tensors pass
    _check_adam_float_state_tensors and all lie on ``device``."""
    T = torch.Tensor
    if not (isinstance(p, T) and isinstance(g, T) and isinstance(exp_avg, T)
            and isinstance(exp_avg_sq, T) and isinstance(step, T)
            and isinstance(skipped, T)):  # fmt: skip
        return False
    n = p.numel()
    f32 = torch.float32
    return (
        _adam_parameter_pass(p, g, step, skipped, device)
        and exp_avg.dtype == f32 and exp_avg.numel() == n and exp_avg.is_contiguous()
        and exp_avg_sq.dtype == f32 and exp_avg_sq.numel() == n and exp_avg_sq.is_contiguous()
        and exp_avg.device == device and exp_avg_sq.device == device
    )  # fmt: skip


def check_adam_multi_step(
    params, grads, exp_avgs, exp_avg_sqs, steps, skipped,
    lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale,
):  # fmt: skip
    op = "adam_multi_step_"
    lists = dict(
        params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps,
        skipped=skipped,
    )  # fmt: skip
    _check_adam_lists(op, params, lists)
    _check_tensor(op, "params[0]", params[0])
    _check_adam_scalars(op, lr, beta1, beta2, eps, weight_decay, gnorm_scale)
    device = params[0].device
    for i, per_tensor in enumerate(zip(*lists.values())):
        if not _adam_float_state_tensors_pass(*per_tensor, device):
            p, g, m, v, step, skip = per_tensor
            where = f"{op}: tensor {i}"
            _check_adam_float_state_tensors(where, p, g, m, v, step, skip)
            _check_same_device(
                where, "p", p, g=g, exp_avg=m, exp_avg_sq=v, step=step, skipped=skip
            )  # fmt: skip
            _check_same_device(op, "params[0]", params[0], **{f"params[{i}]": p})
            raise AssertionError(f"{where}: _adam_float_state_tensors_pass and the checks disagree")


# --------------------------------------------------------------------------- definitions


def _first_tensor(args) -> torch.Tensor | None:
    """The first tensor argument, or the first tensor of the first tensor-list argument (a
    call that passed its checks has one)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


_ROUTERS: dict[str, Callable] = {}


def _plain_tensor_class(cls: type) -> bool:
    """Tensor or Parameter (or a Parameter subclass adding neither torch function nor
    dispatch)."""
    return (
        cls is torch.Tensor
        or cls is torch.nn.Parameter
        or (
            issubclass(cls, torch.nn.Parameter)
            and cls.__torch_function__ is torch.nn.Parameter.__torch_function__
            and cls.__torch_dispatch__ is torch.Tensor.__torch_dispatch__
        )
    )


def _all_plain_tensors(tensors: list[torch.Tensor]) -> bool:
    # By class: an optimizer step passes hundreds of tensors of two or three classes.
    return all(_plain_tensor_class(cls) for cls in set(map(type, tensors)))


def _state_has_work(tensors: list[torch.Tensor]) -> bool:
    """The checks of ``_dispatcher_has_work`` on torch's thread-local state and the tensors;
    ``_C.dispatcher_has_work`` makes the same ones in a single call when the extension is
    built (tests/test_ops.py compares the two under each condition). One difference: the
    native one reads this thread's dispatch-mode stack, this one the process-wide one, so
    inside a mode's own ``__torch_dispatch__`` (the mode popped) or in a thread without a
    mode it answers "no work", as the dispatcher would."""
    return (
        torch.jit.is_tracing()
        or torch._C._is_torch_function_mode_enabled()
        or is_in_torch_dispatch_mode()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd._profiler_enabled()
        or tensors[0].device.type not in ("cpu", "cuda")  # meta tensors take the fake kernel
        or torch.is_autocast_enabled(tensors[0].device.type)
        or any(t.is_neg() or t.is_conj() or t._is_zerotensor() for t in tensors)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


_native_state_has_work: Callable[[list[torch.Tensor]], bool] | None = None


def use_native_state_check(check: Callable[[list[torch.Tensor]], bool]) -> None:
    """Called once the extension is loaded: ``check`` replaces ``_state_has_work``. Each of
    its Python calls costs a few microseconds with cold caches (after a large op), ~25 us in
    all, against one call here."""
    global _native_state_has_work
    _native_state_has_work = check


def _dispatcher_has_work(tensors: list[torch.Tensor]) -> bool:
    """Whether torch's dispatcher would do more for this call than run the router: autograd
    (a tensor needs grad, or a forward-mode AD level is open), autocast, tracing (torch.jit
    too) or compiling, function or dispatch modes (fake and functional tensors), functorch
    transforms, the profiler, tensor subclasses, devices other than CPU and CUDA (meta),
    lazily negated or conjugated views and zero tensors (their data is not their value).
    torch.compile is asked first: it folds the answer, and would stop at the native call."""
    if (
        torch.compiler.is_compiling()
        or forward_ad._current_level >= 0
        or not _all_plain_tensors(tensors)
    ):
        return True
    check = _native_state_has_work or _state_has_work
    return check(tensors)


def plain_eager(tensors: list[torch.Tensor]) -> bool:
    """Whether a call on these tensors may skip torch's dispatcher (see ``call``)."""
    return bool(tensors) and not _dispatcher_has_work(tensors)


def call(name: str, *args):
    """``torch.ops.lowprec.<name>(*args)``. A plain eager call skips torch's dispatcher and
    runs the router (checker, then the backend kernel) itself: on a call that follows a
    large memory-bound op, the dispatcher's Python layers (autograd wrapper, boxed router)
    ran with cold caches and cost 40-130 us, against ~20 us warm (matmul_4bit, M = 1,
    4096 x 4096, CPU: 296-398 us through the dispatcher against 253-270 us through the
    router alone). Where the backend has an eager entry (``_dispatch.register_eager``), its
    one native call replaces the router's Python layers too."""
    if name in _LINEARS and forward_ad._current_level >= 0 and torch.compiler.is_compiling():
        op = getattr(torch.ops.lowprec, name)
        return _with_tangents(_LINEARS[name], args, lambda primal_args: op(*primal_args))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if plain_eager(tensors):
        eager = eager_for(name, tensors[0].device.type)
        if eager is not None:
            result = eager(*args)
            if result is not None:
                return result
        return _ROUTERS[name](*args)
    return getattr(torch.ops.lowprec, name)(*args)


def route_mutating(name: str, mutated: list[torch.Tensor], *args) -> None:
    """Runs ``name``, an op that writes into ``mutated`` (its ``Tensor(a!)`` arguments), for a
    call the caller found ``plain_eager``: by the backend's eager entry where it has one and
    takes the arguments (it returns True), else by the router; then bumps the version counters
    of ``mutated`` as the dispatcher's ADInplaceOrView layer would: autograd still refuses a
    backward through their old values."""
    first = _first_tensor(args)
    eager = eager_for(name, first.device.type) if first is not None else None
    if eager is None or not eager(*args):
        _ROUTERS[name](*args)
    try:
        torch.autograd.graph.increment_version(mutated)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in mutated:
            torch.autograd.graph.increment_version(t)


def _define(
    schema: str,
    check: Callable,
    fake_outputs: Callable,
    beyond_kernels: Callable[..., bool] | None = None,
) -> None:
    """Defines ``lowprec::<schema>`` with its checker, fake implementation and router.

    ``beyond_kernels(*args)``: True for valid arguments that the backends' kernels cannot
    compute as the reference defines (an accumulator that would overflow); the router then
    runs the reference kernel, whichever backend is chosen."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)

    def fake(*args):
        check(*args)
        return fake_outputs(*args)

    def route(*args):
        check(*args)
        if beyond_kernels is not None and beyond_kernels(*args):
            return reference_kernel(name)(*args)
        _, kernel = kernel_for(name, _first_tensor(args).device.type)
        return kernel(*args)

    _ROUTERS[name] = route
    fake.__name__ = f"{name}_fake"
    route.__name__ = f"{name}_route"
    torch.library.register_fake(f"lowprec::{name}", fake, lib=_LIB)
    _LIB.impl(name, route, "CompositeExplicitAutograd")


def _empty(t: torch.Tensor, shape, dtype) -> torch.Tensor:
    return t.new_empty(shape, dtype=dtype)


_define(
    "quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    check_quantize_blockwise,
    lambda A, code, bs: (
        _empty(A, A.shape, torch.uint8),
        _empty(A, (num_blocks(A.numel(), bs),), torch.float32),
    ),
)

_define(
    "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype)"
    " -> Tensor",
    check_dequantize_blockwise,
    lambda A, absmax, code, bs, dtype: _empty(A, A.shape, dtype),
)

_define(
    "quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    check_quantize_4bit,
    lambda A, bs, qt: (
        _empty(A, ((A.numel() + 1) // 2, 1), torch.uint8),
        _empty(A, (num_blocks(A.numel(), bs),), torch.float32),
    ),
)

_WEIGHT_4BIT_ARGS = (
    "Tensor A, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, "
    "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize"
)

_define(
    "dequantize_4bit(Tensor A, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, "
    "ScalarType dtype, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "int nested_blocksize) -> Tensor",
    check_dequantize_4bit,
    lambda A, absmax, code, bs, shape, dtype, *nested: _empty(A, shape, dtype),
)

_define(
    f"matmul_4bit(Tensor x, {_WEIGHT_4BIT_ARGS}, Tensor? bias) -> Tensor",
    check_matmul_4bit,
    lambda x, A, absmax, code, bs, shape, *rest: _empty(x, (*x.shape[:-1], shape[0]), x.dtype),
)

_define(
    "int8_quantize_weight(Tensor W) -> (Tensor, Tensor)",
    check_int8_quantize_weight,
    lambda W: (_empty(W, W.shape, torch.int8), _empty(W, (W.shape[0],), torch.float32)),
)


def _fake_int8_vectorwise_quant(A, threshold):
    rows = A.numel() // A.shape[-1]
    if threshold > 0.0:
        # The number of outlier columns depends on the data: an unbacked size for compile.
        cols = A.shape[-1]
        # new_dynamic_size takes only a static bound; a symbolic width gets a _check instead.
        k = torch.library.get_ctx().new_dynamic_size(max=cols if isinstance(cols, int) else None)
        torch._check(k <= cols)
    else:
        k = 0
    return (
        _empty(A, A.shape, torch.int8),
        _empty(A, (rows,), torch.float32),
        _empty(A, (k,), torch.int64),
    )


_define(
    "int8_vectorwise_quant(Tensor A, float threshold) -> (Tensor, Tensor, Tensor)",
    check_int8_vectorwise_quant,
    _fake_int8_vectorwise_quant,
)

# The int8 GEMM kernels (cpu, triton) sum the products of a row in int32: exact while
# in_features * 128^2 fits (int8_scaled_mm takes any int8 codes, -128 included), 131,071
# columns; wider rows run the reference (float64 sums).
INT8_INT32_EXACT_MAX_K = torch.iinfo(torch.int32).max // 128**2


def _int8_sums_overflow_int32(weight: torch.Tensor) -> bool:
    return weight.shape[1] > INT8_INT32_EXACT_MAX_K


_define(
    "int8_scaled_mm(Tensor A, Tensor row_stats, Tensor weight, Tensor weight_scale, "
    "Tensor? bias, ScalarType dtype) -> Tensor",
    check_int8_scaled_mm,
    lambda A, rs, W, ws, bias, dtype: _empty(A, (*A.shape[:-1], W.shape[0]), dtype),
    beyond_kernels=lambda A, rs, W, *rest: _int8_sums_overflow_int32(W),
)

_define(
    "int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, float threshold)"
    " -> Tensor",
    check_int8_linear,
    lambda x, W, ws, bias, thr: _empty(x, (*x.shape[:-1], W.shape[0]), x.dtype),
    beyond_kernels=lambda x, W, *rest: _int8_sums_overflow_int32(W),
)

_define(
    "adam8bit_step_(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) state2, "
    "Tensor(d!) absmax1, Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, Tensor(f!) step, "
    "Tensor(g!) skipped, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled, float gnorm_scale, int blocksize) -> ()",
    check_adam8bit_step,
    lambda *args: None,
)

# The same step over many tensors of one param group: one call (and, on GPU, few launches)
# for a whole model instead of one per parameter. The entries' tensors must not overlap (a
# step or state shared by two entries is updated once by the kernels, which run the entries
# in parallel, and twice by the reference). Not checked: the optimizers refuse duplicate
# parameters, and a check of every pair would cost the eager step more than its kernel on
# small tensors.
_define(
    "adam8bit_multi_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
    "Tensor(c!)[] state2, Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, "
    "Tensor qmap2, Tensor(f!)[] steps, Tensor(g!)[] skipped, float lr, float beta1, "
    "float beta2, float eps, float weight_decay, bool decoupled, float gnorm_scale, "
    "int blocksize) -> ()",
    check_adam8bit_multi_step,
    lambda *args: None,
)


# The same step with float32 states (the optimizers' tensors below min_8bit_size); its
# entries must not overlap either.
_define(
    "adam_multi_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] skipped, float lr, "
    "float beta1, float beta2, float eps, float weight_decay, bool decoupled, "
    "float gnorm_scale) -> ()",
    check_adam_multi_step,
    lambda *args: None,
)


# A list of tensors as custom_op's schema inference reads it: typing.List, since torch 2.6
# (the oldest torch supported) infers no schema from the built-in list[Tensor].
TensorList = List[torch.Tensor]  # noqa: UP006


# The optimizers' entry point: adam8bit_multi_step_ with the hyperparameters in a tensor.
@torch.library.custom_op(
    "lowprec::adam8bit_group_step_",
    mutates_args=("params", "state1", "state2", "absmax1", "absmax2", "steps", "skipped"),
)
def adam8bit_group_step_(
    params: TensorList, grads: TensorList, state1: TensorList,
    state2: TensorList, absmax1: TensorList, absmax2: TensorList,
    qmap1: torch.Tensor, qmap2: torch.Tensor, steps: TensorList,
    skipped: TensorList, hyperparameters: torch.Tensor, decoupled: bool,
    blocksize: int,
) -> None:  # fmt: skip
    """``lowprec::adam8bit_multi_step_`` with (lr, beta1, beta2, eps, weight_decay) read from
    a float64 CPU tensor (no device sync).

    Why a tensor: under torch.compile a changing Python float (an LR schedule) becomes a
    symbolic float, and this torch either recompiles for every value a custom op's float
    argument takes or, with inductor, silently keeps passing the value it compiled with.
    A tensor argument is an ordinary graph input. The optimizers call this op only; its
    checks and kernels are those of ``adam8bit_multi_step_``.
    """
    lr, beta1, beta2, eps, weight_decay = hyperparameters.tolist()
    torch.ops.lowprec.adam8bit_multi_step_(
        params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, skipped,
        lr, beta1, beta2, eps, weight_decay, decoupled, 1.0, blocksize,
    )  # fmt: skip


@adam8bit_group_step_.register_fake
def _adam8bit_group_step_fake(*args) -> None:
    return None


# --------------------------------------------------------------------------- autograd
# The linear ops, matmul_4bit and int8_linear, are differentiated in x and bias only: the
# quantized weight is frozen (the QLoRA / LLM.int8 setting). Each has its own kernel for the
# Autograd dispatch key, as aten's ops do, so that both modes live in one place:
#   * reverse mode: an autograd.Function when an input needs grad. Under torch.func's
#     reverse-mode transforms (grad, jacrev) a Function cannot be applied from inside a
#     dispatcher kernel, so those are refused by name (torch.library.register_autograd's
#     kernel failed there too);
#   * forward mode (torch.autograd.forward_ad, torch.func.jvp / jacfwd, nested, under vmap):
#     the tangents of x and bias are unpacked, the primal is computed, and the output gets the
#     tangent dx @ W.T + dbias by further dispatched calls, themselves differentiable.
#     (register_autograd has no forward-mode formula.)
# Both take W as the backward formula does: exact for matmul_4bit, which is linear in x; for
# int8_linear, which quantizes x itself, the dequantized weight is the straight-through
# derivative.


def _grad_bias(grad_out: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(bias_dtype)


class _Linear:
    """How one linear op's arguments are laid out, and its weight's products."""

    def __init__(self, name: str, x_at: int, bias_at: int, grad_x, tangent_x):
        self.name = name
        self.op = getattr(torch.ops.lowprec, name).default
        self.x_at, self.bias_at = x_at, bias_at
        self.grad_x = grad_x  # (args, grad_out) -> grad_out @ W
        self.tangent_x = tangent_x  # (args, x_tangent) -> x_tangent @ W.T

    def below_autograd(self, keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return self.op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _matmul_4bit_grad_x(args, grad_out):
    A, absmax, code, bs, shape, *nested = args[1:10]
    W = torch.ops.lowprec.dequantize_4bit(A, absmax, code, bs, shape, grad_out.dtype, *nested)
    return grad_out @ W


def _matmul_4bit_tangent_x(args, x_tangent):
    return torch.ops.lowprec.matmul_4bit(x_tangent, *args[1:10], None)


# The int8 products scale grad_out's columns (or the product's) by the row scales instead of
# the weight's rows: the codes then only change type (exactly: |code| <= 127), one pass over
# the weight where dequantizing it took three (a float32 copy, its scaled copy, the cast),
# which made Linear8bitLt's bf16 forward + backward 14x nn.Linear's at M = 1, 4096 x 4096.
# One rounding to the dtype either way, of the scaled gradient instead of the weight.
def _int8_linear_grad_x(args, grad_out):
    scaled = (grad_out.float() * (args[2] / INT8_SCALE)).to(grad_out.dtype)
    return scaled @ args[1].to(grad_out.dtype)


def _int8_linear_tangent_x(args, x_tangent):
    product = x_tangent @ args[1].to(x_tangent.dtype).T
    return (product.float() * (args[2] / INT8_SCALE)).to(x_tangent.dtype)


def _linear_tangent(linear: _Linear, args, x_tangent, bias_tangent, y) -> torch.Tensor:
    """dx @ W.T + dbias, in y's dtype; y gives the shape where only the bias has a tangent."""
    if x_tangent is None:
        tangent = torch.zeros_like(y)
    else:
        tangent = linear.tangent_x(args, x_tangent).to(y.dtype)
    if bias_tangent is not None:
        tangent = tangent + bias_tangent.to(y.dtype)
    return tangent


class _LinearFunction(torch.autograd.Function):
    """Reverse mode of a _Linear op: forward(linear, keyset, *op_args)."""

    @staticmethod
    def forward(linear: _Linear, keyset, *args):
        return linear.below_autograd(keyset, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        linear, _, *args = inputs
        bias = args[linear.bias_at]
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # The weight's arguments only: keeping x would hold every layer's activation until
        # the backward, which does not need it.
        ctx.linear = linear
        ctx.args = [None if i in (linear.x_at, linear.bias_at) else a for i, a in enumerate(args)]

    @staticmethod
    def backward(ctx, grad_out):
        linear, needs = ctx.linear, ctx.needs_input_grad[2:]
        grads = [None] * len(ctx.args)
        if needs[linear.x_at]:
            grads[linear.x_at] = linear.grad_x(ctx.args, grad_out)
        if needs[linear.bias_at]:
            grads[linear.bias_at] = _grad_bias(grad_out, ctx.bias_dtype)
        return None, None, *grads


def _with_tangents(linear: _Linear, args, primal) -> torch.Tensor:
    """``primal(args)`` with x and bias stripped of their tangents, made dual with the tangent
    dx @ W.T + dbias where they had one (forward-mode AD)."""
    args = list(args)
    x_tangent = bias_tangent = None
    if forward_ad._current_level >= 0:
        args[linear.x_at], x_tangent = forward_ad.unpack_dual(args[linear.x_at])
        if args[linear.bias_at] is not None:
            args[linear.bias_at], bias_tangent = forward_ad.unpack_dual(args[linear.bias_at])
    y = primal(args)
    if x_tangent is None and bias_tangent is None:
        return y
    return forward_ad.make_dual(y, _linear_tangent(linear, args, x_tangent, bias_tangent, y))


def _register_linear_autograd(linear: _Linear) -> None:
    def primal(keyset, args):
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            if torch._C._are_functorch_transforms_active():
                raise NotImplementedError(
                    f"lowprec::{linear.name}: torch.func's reverse-mode transforms (grad, "
                    "vjp, jacrev, hessian) are not supported; torch.autograd (backward(), "
                    "torch.autograd.grad) and torch.func's forward-mode ones (jvp, jacfwd) are"
                )
            return _LinearFunction.apply(linear, keyset, *args)
        return linear.below_autograd(keyset, args)

    def autograd_kernel(keyset, *args):
        return _with_tangents(linear, args, lambda a: primal(keyset, a))

    _LIB.impl(linear.name, autograd_kernel, "Autograd", with_keyset=True)
    _LINEARS[linear.name] = linear


# The linear ops by name. ``call`` applies their forward-mode rule itself while torch.compile
# traces (the tangents are not visible to the Autograd kernel under its tracing).
_LINEARS: dict[str, _Linear] = {}
_register_linear_autograd(
    _Linear("matmul_4bit", 0, 10, _matmul_4bit_grad_x, _matmul_4bit_tangent_x)
)
_register_linear_autograd(_Linear("int8_linear", 0, 3, _int8_linear_grad_x, _int8_linear_tangent_x))


# --------------------------------------------------------------------------- autocast
# Under torch.autocast the linear ops compute in the autocast dtype, as F.linear does. Only
# the activation and bias are cast: scales and codebooks stay float32 (a blanket
# register_autocast would cast them too and break the format).


def _register_autocast(name: str, cast_positions: tuple[int, ...]) -> None:
    op = getattr(torch.ops.lowprec, name).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def cast_and_redispatch(*args, _key=key, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            for i in cast_positions:
                t = args[i]
                if (
                    isinstance(t, torch.Tensor)
                    and t.is_floating_point()
                    and t.device.type == _device_type
                ):
                    args[i] = t.to(dtype)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        op.py_impl(key)(cast_and_redispatch)  # the path torch.compile traces
        _LIB.impl(
            name, lambda _keyset, *a, _f=cast_and_redispatch: _f(*a), key_name, with_keyset=True
        )


_register_autocast("matmul_4bit", cast_positions=(0, 10))  # x, bias
_register_autocast("int8_linear", cast_positions=(0, 3))  # x, bias

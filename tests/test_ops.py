"""Every ``torch.ops.lowprec`` op: opcheck, meta/fake shapes, the bad-input table, backends."""

import os

import numpy as np
import pytest
import torch
from conftest import spy_on_router
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import lowprec_kernels as lpk
from lowprec_kernels import _dispatch
from lowprec_kernels import functional as LF
from lowprec_kernels.reference import codebooks

ops = torch.ops.lowprec

ALL_OPS = [
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
    "adam8bit_multi_step_",
    "adam_multi_step_",
]


def randn_nonzero(*shape, dtype=torch.float32):
    x = torch.randn(*shape)
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


def arg_names(op: str) -> list[str]:
    return [a.name for a in getattr(ops, op).default._schema.arguments]


def test_every_op_is_covered():
    names = torch._C._dispatch_get_all_op_names()
    defined = {n.split("::", 1)[1] for n in names if n.startswith("lowprec::")}
    # adam8bit_group_step_ (the optimizers' wrapper of adam8bit_multi_step_, hyperparameters
    # in a tensor) has its opcheck in tests/test_optim.py.
    assert defined == set(ALL_OPS) | {"adam8bit_group_step_"}


# ---------------------------------------------------------------- valid sample inputs


def _fourbit(shape=(5, 33), blocksize=32, quant_type="nf4", double_quant=False):
    w = randn_nonzero(*shape)
    qw, st = LF.quantize_4bit(w, blocksize, quant_type, double_quant)
    return qw, st


def _adam(n=300, dtype=torch.float32, blocksize=64):
    p = randn_nonzero(n, dtype=dtype)
    nb = -(-n // blocksize)
    return dict(
        p=p,
        g=randn_nonzero(n, dtype=dtype),
        state1=torch.randint(0, 256, (n,), dtype=torch.uint8),
        state2=torch.randint(0, 256, (n,), dtype=torch.uint8),
        absmax1=torch.rand(nb) + 0.1,
        absmax2=torch.rand(nb) + 0.1,
        qmap1=codebooks.dynamic_map(True),
        qmap2=codebooks.dynamic_map(False),
        step=torch.tensor(3.0),
        skipped=torch.tensor(0.0),
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        decoupled=True,
        gnorm_scale=1.0,
        blocksize=blocksize,
    )


def valid_args(op: str, variant: str = "") -> dict:
    """Valid named arguments of ``op`` (odd sizes, n % blocksize != 0)."""
    if op == "quantize_blockwise":
        return dict(A=randn_nonzero(3, 77), code=codebooks.dynamic_map(True), blocksize=64)
    if op == "dequantize_blockwise":
        q = torch.randint(0, 256, (3, 77), dtype=torch.uint8)
        return dict(
            A=q, absmax=torch.rand(4) + 0.1, code=codebooks.dynamic_map(True), blocksize=64,
            dtype=torch.float16,
        )  # fmt: skip
    if op == "quantize_4bit":
        return dict(A=randn_nonzero(5, 33, dtype=torch.bfloat16), blocksize=32, quant_type="nf4")
    if op in ("dequantize_4bit", "matmul_4bit"):
        qw, st = _fourbit(double_quant=variant == "nested", quant_type="fp4" if variant else "nf4")
        absmax, code, bs, shape, n_absmax, n_code, offset, n_bs = st.op_args()
        weight = dict(
            A=qw, absmax=absmax, code=code, blocksize=bs, shape=shape, nested_absmax=n_absmax,
            nested_code=n_code, offset=offset, nested_blocksize=n_bs,
        )  # fmt: skip
        if op == "dequantize_4bit":
            return dict(
                A=qw, absmax=absmax, code=code, blocksize=bs, shape=shape, dtype=torch.float16,
                nested_absmax=n_absmax, nested_code=n_code, offset=offset,
                nested_blocksize=n_bs,
            )  # fmt: skip
        return dict(x=randn_nonzero(3, 33), **weight, bias=randn_nonzero(5))
    if op == "int8_quantize_weight":
        return dict(W=randn_nonzero(7, 13))
    if op == "int8_vectorwise_quant":
        A = randn_nonzero(2, 3, 13)
        A[1, 2, 4] = 9.0
        return dict(A=A, threshold=6.0 if variant == "outliers" else 0.0)
    if op == "int8_scaled_mm":
        return dict(
            A=torch.randint(-127, 128, (2, 3, 13), dtype=torch.int8),
            row_stats=torch.rand(6) + 0.1,
            weight=torch.randint(-127, 128, (5, 13), dtype=torch.int8),
            weight_scale=torch.rand(5) + 0.1,
            bias=randn_nonzero(5),
            dtype=torch.bfloat16,
        )
    if op == "int8_linear":
        x = randn_nonzero(3, 13)
        x[0, 2] = -20.0
        return dict(
            x=x,
            weight=torch.randint(-127, 128, (5, 13), dtype=torch.int8),
            weight_scale=torch.rand(5) + 0.1,
            bias=randn_nonzero(5),
            threshold=6.0,
        )
    if op == "adam8bit_step_":
        return _adam()
    if op == "adam8bit_multi_step_":
        return _adam_multi()
    if op == "adam_multi_step_":
        return _adam_float_states()
    raise AssertionError(op)


_PER_TENSOR = ("p", "g", "state1", "state2", "absmax1", "absmax2", "step", "skipped")
_MULTI_NAMES = ("params", "grads", "state1", "state2", "absmax1", "absmax2", "steps", "skipped")


def _adam_multi(sizes=(300, 70)):
    """Two tensors of one param group, in adam8bit_multi_step_'s list arguments."""
    singles = [_adam(n) for n in sizes]
    args = {k: v for k, v in singles[0].items() if k not in _PER_TENSOR}
    for single_name, name in zip(_PER_TENSOR, _MULTI_NAMES):
        args[name] = [s[single_name] for s in singles]
    return args


def _adam_float_states(sizes=(300, 70)):
    """Two tensors with float32 states, in adam_multi_step_'s list arguments."""
    singles = [_adam(n) for n in sizes]
    args = {k: singles[0][k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}
    args |= dict(
        params=[s["p"] for s in singles], grads=[s["g"] for s in singles],
        exp_avgs=[torch.randn(n) * 0.1 for n in sizes],
        exp_avg_sqs=[torch.rand(n) * 0.01 for n in sizes],
        steps=[s["step"] for s in singles], skipped=[s["skipped"] for s in singles],
        decoupled=True, gnorm_scale=1.0,
    )  # fmt: skip
    return args


def _second(name: str, bad):
    """A change of adam_multi_step_'s list ``name``: its second tensor becomes ``bad``."""
    return {name: lambda a: [a[name][0], bad(a[name][1]) if callable(bad) else bad]}


def call(op: str, args: dict):
    return getattr(ops, op)(*[args[n] for n in arg_names(op)])


SAMPLES = [
    ("quantize_blockwise", ""),
    ("dequantize_blockwise", ""),
    ("quantize_4bit", ""),
    ("dequantize_4bit", ""),
    ("dequantize_4bit", "nested"),
    ("matmul_4bit", ""),
    ("matmul_4bit", "nested"),
    ("int8_quantize_weight", ""),
    ("int8_vectorwise_quant", ""),
    ("int8_vectorwise_quant", "outliers"),
    ("int8_scaled_mm", ""),
    ("int8_linear", ""),
    ("adam8bit_step_", ""),
    ("adam8bit_multi_step_", ""),
    ("adam_multi_step_", ""),
]
SAMPLE_IDS = [f"{op}-{v}" if v else op for op, v in SAMPLES]


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize(("op", "variant"), SAMPLES, ids=SAMPLE_IDS)
def test_opcheck(op, variant):
    args = valid_args(op, variant)
    if op in ("matmul_4bit", "int8_linear"):
        # so that test_autograd_registration sees an input that needs a gradient
        args["x"].requires_grad_()
        args["bias"].requires_grad_()
    # int8_vectorwise_quant with threshold > 0 has a data-dependent output size (the number
    # of outlier columns). Its fake implementation allocates an unbacked SymInt for it, so the
    # full opcheck (incl. test_faketensor and test_aot_dispatch_dynamic) is expected to pass:
    # nothing is restricted here.
    torch.library.opcheck(getattr(ops, op).default, tuple(args[n] for n in arg_names(op)))


# ---------------------------------------------------------------- meta / fake shapes


def _to_meta(v):
    if isinstance(v, list):
        return [_to_meta(t) for t in v]
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _flat(out):
    return [] if out is None else list(out) if isinstance(out, tuple | list) else [out]


@pytest.mark.parametrize(
    ("op", "variant"),
    [s for s in SAMPLES if s != ("int8_vectorwise_quant", "outliers")],
    ids=[i for i in SAMPLE_IDS if i != "int8_vectorwise_quant-outliers"],
)
def test_meta_matches_eager(op, variant):
    args = valid_args(op, variant)
    meta_out = _flat(call(op, {k: _to_meta(v) for k, v in args.items()}))
    real_out = _flat(call(op, args))
    assert len(meta_out) == len(real_out)
    for m, r in zip(meta_out, real_out):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype) == (r.shape, r.dtype)


EXPECTED_SHAPES = {
    "quantize_blockwise": [((3, 77), torch.uint8), ((4,), torch.float32)],
    "dequantize_blockwise": [((3, 77), torch.float16)],
    "quantize_4bit": [((83, 1), torch.uint8), ((6,), torch.float32)],
    "dequantize_4bit": [((5, 33), torch.float16)],
    "matmul_4bit": [((3, 5), torch.float32)],
    "int8_quantize_weight": [((7, 13), torch.int8), ((7,), torch.float32)],
    "int8_vectorwise_quant": [((2, 3, 13), torch.int8), ((6,), torch.float32), ((0,), torch.int64)],
    "int8_scaled_mm": [((2, 3, 5), torch.bfloat16)],
    "int8_linear": [((3, 5), torch.float32)],
    "adam8bit_step_": [],
    "adam8bit_multi_step_": [],
    "adam_multi_step_": [],
}


@pytest.mark.parametrize("op", ALL_OPS)
def test_fake_shapes(op):
    args = valid_args(op)
    with FakeTensorMode() as mode:

        def to_fake(v):
            if isinstance(v, list):
                return [to_fake(t) for t in v]
            return mode.from_tensor(v) if isinstance(v, torch.Tensor) else v

        fake = {k: to_fake(v) for k, v in args.items()}
        out = _flat(call(op, fake))
    assert [(tuple(t.shape), t.dtype) for t in out] == EXPECTED_SHAPES[op]


def test_fake_vectorwise_outliers_is_data_dependent():
    args = valid_args("int8_vectorwise_quant", "outliers")
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        q, rs, cols = ops.int8_vectorwise_quant(mode.from_tensor(args["A"]), 6.0)
    assert q.shape == (2, 3, 13) and rs.shape == (6,)
    assert cols.dim() == 1 and cols.dtype == torch.int64
    assert isinstance(cols.shape[0], torch.SymInt), "an unbacked size, not a guess"
    # Plain meta tensors cannot express that size: torch refuses rather than guessing.
    with pytest.raises(RuntimeError, match="data-dependent"):
        ops.int8_vectorwise_quant(args["A"].to("meta"), 6.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_empty_batch_is_valid(dtype):
    qw, st = _fourbit((5, 64), 64)
    y = LF.matmul_4bit(torch.empty(0, 64, dtype=dtype), qw, st)
    assert y.shape == (0, 5) and y.dtype == dtype
    y = LF.int8_scaled_mm(
        torch.empty(2, 0, 8, dtype=torch.int8), torch.empty(0),
        torch.ones(3, 8, dtype=torch.int8), torch.ones(3), dtype=dtype,
    )  # fmt: skip
    assert y.shape == (2, 0, 3) and y.dtype == dtype


# ---------------------------------------------------------------- the bad-input table


def _meta(v):
    return v.to("meta")


def _noncontig(n, dtype=torch.float32):
    return randn_nonzero(n, 2, dtype=dtype)[:, 0]


# (op, variant, id, {arg: new value or callable(args) -> new value}, exception, argument name)
BAD = [
    # quantize_blockwise
    ("quantize_blockwise", "", "A-int", {"A": torch.ones(3, 5, dtype=torch.int32)}, TypeError, "A"),
    ("quantize_blockwise", "", "A-float64", {"A": torch.ones(10, dtype=torch.float64)}, TypeError, "A"),
    ("quantize_blockwise", "", "A-empty", {"A": torch.empty(0, 4)}, ValueError, "A"),
    ("quantize_blockwise", "", "code-fp64", {"code": lambda a: a["code"].double()}, TypeError, "code"),
    ("quantize_blockwise", "", "code-size", {"code": lambda a: a["code"][:255]}, ValueError, "code"),
    ("quantize_blockwise", "", "code-2d", {"code": lambda a: a["code"].view(16, 16)}, ValueError, "code"),
    ("quantize_blockwise", "", "code-device", {"code": lambda a: _meta(a["code"])}, ValueError, "code"),
    ("quantize_blockwise", "", "blocksize-32", {"blocksize": 32}, ValueError, "blocksize"),
    ("quantize_blockwise", "", "blocksize-100", {"blocksize": 100}, ValueError, "blocksize"),
    ("quantize_blockwise", "", "blocksize-8192", {"blocksize": 8192}, ValueError, "blocksize"),
    # dequantize_blockwise
    ("dequantize_blockwise", "", "A-float", {"A": lambda a: a["A"].float()}, TypeError, "A"),
    ("dequantize_blockwise", "", "A-empty", {"A": torch.empty(0, dtype=torch.uint8)}, ValueError, "A"),
    ("dequantize_blockwise", "", "absmax-fp16", {"absmax": lambda a: a["absmax"].half()}, TypeError, "absmax"),
    ("dequantize_blockwise", "", "absmax-len", {"absmax": torch.ones(3)}, ValueError, "absmax"),
    ("dequantize_blockwise", "", "absmax-device", {"absmax": lambda a: _meta(a["absmax"])}, ValueError, "absmax"),
    ("dequantize_blockwise", "", "blocksize-mismatch", {"blocksize": 128}, ValueError, "absmax"),
    ("dequantize_blockwise", "", "blocksize-48", {"blocksize": 48}, ValueError, "blocksize"),
    ("dequantize_blockwise", "", "dtype-int", {"dtype": torch.int32}, ValueError, "dtype"),
    ("dequantize_blockwise", "", "dtype-fp64", {"dtype": torch.float64}, ValueError, "dtype"),
    ("dequantize_blockwise", "", "code-size", {"code": torch.zeros(16)}, ValueError, "code"),
    ("dequantize_blockwise", "", "code-2d", {"code": lambda a: a["code"].view(16, 16)}, ValueError, "code"),
    # quantize_4bit
    ("quantize_4bit", "", "A-int", {"A": torch.ones(4, dtype=torch.int64)}, TypeError, "A"),
    ("quantize_4bit", "", "A-empty", {"A": torch.empty(3, 0)}, ValueError, "A"),
    ("quantize_4bit", "", "blocksize-16", {"blocksize": 16}, ValueError, "blocksize"),
    ("quantize_4bit", "", "blocksize-96", {"blocksize": 96}, ValueError, "blocksize"),
    ("quantize_4bit", "", "blocksize-8192", {"blocksize": 8192}, ValueError, "blocksize"),
    ("quantize_4bit", "", "quant_type", {"quant_type": "int4"}, ValueError, "quant_type"),
    # dequantize_4bit: the QuantState not matching the packed data
    ("dequantize_4bit", "", "A-float", {"A": lambda a: a["A"].float()}, TypeError, "A"),
    ("dequantize_4bit", "", "shape-mismatch", {"shape": [5, 35]}, ValueError, "A"),
    ("dequantize_4bit", "", "shape-zero", {"shape": [0, 33]}, ValueError, "shape"),
    ("dequantize_4bit", "", "shape-empty", {"shape": []}, ValueError, "shape"),
    ("dequantize_4bit", "", "blocksize-mismatch", {"blocksize": 64}, ValueError, "absmax"),
    ("dequantize_4bit", "", "blocksize-48", {"blocksize": 48}, ValueError, "blocksize"),
    ("dequantize_4bit", "", "absmax-len", {"absmax": lambda a: a["absmax"][:-1]}, ValueError, "absmax"),
    ("dequantize_4bit", "", "absmax-fp16", {"absmax": lambda a: a["absmax"].half()}, TypeError, "absmax"),
    ("dequantize_4bit", "", "absmax-2d", {"absmax": lambda a: a["absmax"].reshape(1, -1)}, ValueError, "absmax"),
    ("dequantize_4bit", "", "absmax-device", {"absmax": lambda a: _meta(a["absmax"])}, ValueError, "absmax"),
    ("dequantize_4bit", "", "code-size", {"code": torch.zeros(256)}, ValueError, "code"),
    ("dequantize_4bit", "", "code-2d", {"code": lambda a: a["code"].view(4, 4)}, ValueError, "code"),
    ("dequantize_4bit", "", "dtype-int", {"dtype": torch.int8}, ValueError, "dtype"),
    ("dequantize_4bit", "", "nested-without-uint8", {"nested_absmax": torch.ones(1), "nested_code": codebooks.dynamic_map(), "offset": torch.tensor(0.0)}, ValueError, "nested_absmax"),
    ("dequantize_4bit", "", "uint8-absmax-without-nested", {"absmax": lambda a: a["absmax"].to(torch.uint8)}, ValueError, "nested_absmax"),
    ("dequantize_4bit", "nested", "nested_absmax-len", {"nested_absmax": torch.ones(2)}, ValueError, "nested_absmax"),
    ("dequantize_4bit", "nested", "nested_absmax-2d", {"nested_absmax": lambda a: a["nested_absmax"].reshape(1, -1)}, ValueError, "nested_absmax"),
    ("dequantize_4bit", "nested", "absmax-2d", {"absmax": lambda a: a["absmax"].reshape(-1, 1)}, ValueError, "absmax"),
    ("dequantize_4bit", "nested", "nested_absmax-fp16", {"nested_absmax": lambda a: a["nested_absmax"].half()}, TypeError, "nested_absmax"),
    ("dequantize_4bit", "nested", "nested_code-size", {"nested_code": torch.zeros(16)}, ValueError, "nested_code"),
    ("dequantize_4bit", "nested", "nested_code-2d", {"nested_code": lambda a: a["nested_code"].view(16, 16)}, ValueError, "nested_code"),
    ("dequantize_4bit", "nested", "offset-size", {"offset": torch.zeros(2)}, ValueError, "offset"),
    ("dequantize_4bit", "nested", "nested_blocksize", {"nested_blocksize": 100}, ValueError, "nested_blocksize"),
    ("dequantize_4bit", "nested", "absmax-len", {"absmax": lambda a: a["absmax"][:-1]}, ValueError, "absmax"),
    ("dequantize_4bit", "nested", "offset-device", {"offset": lambda a: _meta(a["offset"])}, ValueError, "offset"),
    # matmul_4bit
    ("matmul_4bit", "", "x-int", {"x": torch.ones(3, 33, dtype=torch.int32)}, TypeError, "x"),
    ("matmul_4bit", "", "x-lastdim", {"x": torch.ones(3, 32)}, ValueError, "x"),
    ("matmul_4bit", "", "x-0d", {"x": torch.tensor(1.0)}, ValueError, "x"),
    ("matmul_4bit", "", "x-device", {"x": lambda a: _meta(a["x"])}, ValueError, "x"),
    ("matmul_4bit", "", "bias-shape", {"bias": torch.ones(4)}, ValueError, "bias"),
    ("matmul_4bit", "", "bias-2d", {"bias": torch.ones(1, 5)}, ValueError, "bias"),
    ("matmul_4bit", "", "bias-int", {"bias": torch.ones(5, dtype=torch.int32)}, TypeError, "bias"),
    ("matmul_4bit", "", "bias-device", {"bias": lambda a: _meta(a["bias"])}, ValueError, "bias"),
    ("matmul_4bit", "", "shape-3d", {"shape": [5, 3, 11]}, ValueError, "shape"),
    ("matmul_4bit", "", "shape-mismatch", {"shape": [6, 33]}, ValueError, "A"),
    ("matmul_4bit", "nested", "nested_absmax-len", {"nested_absmax": torch.ones(3)}, ValueError, "nested_absmax"),
    # int8_quantize_weight
    ("int8_quantize_weight", "", "W-1d", {"W": torch.ones(5)}, ValueError, "W"),
    ("int8_quantize_weight", "", "W-3d", {"W": torch.ones(2, 3, 4)}, ValueError, "W"),
    ("int8_quantize_weight", "", "W-int8", {"W": torch.ones(2, 3, dtype=torch.int8)}, TypeError, "W"),
    ("int8_quantize_weight", "", "W-empty", {"W": torch.empty(0, 3)}, ValueError, "W"),
    # int8_vectorwise_quant
    ("int8_vectorwise_quant", "", "A-int", {"A": torch.ones(2, 3, dtype=torch.int8)}, TypeError, "A"),
    ("int8_vectorwise_quant", "", "A-0d", {"A": torch.tensor(1.0)}, ValueError, "A"),
    ("int8_vectorwise_quant", "", "A-no-features", {"A": torch.empty(2, 0)}, ValueError, "A"),
    ("int8_vectorwise_quant", "", "threshold-neg", {"threshold": -1.0}, ValueError, "threshold"),
    ("int8_vectorwise_quant", "", "threshold-nan", {"threshold": float("nan")}, ValueError, "threshold"),
    ("int8_vectorwise_quant", "", "threshold-inf", {"threshold": float("inf")}, ValueError, "threshold"),
    ("int8_vectorwise_quant", "", "threshold-float32-zero", {"threshold": 1e-50}, ValueError, "rounds to 0"),
    ("int8_vectorwise_quant", "", "threshold-float32-tie", {"threshold": 2.0**-150}, ValueError, "rounds to 0"),
    # int8_scaled_mm
    ("int8_scaled_mm", "", "A-float", {"A": lambda a: a["A"].float()}, TypeError, "A"),
    ("int8_scaled_mm", "", "A-lastdim", {"A": torch.ones(2, 3, 12, dtype=torch.int8)}, ValueError, "A"),
    ("int8_scaled_mm", "", "A-device", {"A": lambda a: _meta(a["A"])}, ValueError, "A"),
    ("int8_scaled_mm", "", "row_stats-len", {"row_stats": torch.ones(5)}, ValueError, "row_stats"),
    ("int8_scaled_mm", "", "row_stats-fp16", {"row_stats": torch.ones(6, dtype=torch.float16)}, TypeError, "row_stats"),
    ("int8_scaled_mm", "", "weight-3d", {"weight": torch.ones(1, 5, 13, dtype=torch.int8)}, ValueError, "weight"),
    ("int8_scaled_mm", "", "weight-float", {"weight": torch.ones(5, 13)}, TypeError, "weight"),
    ("int8_scaled_mm", "", "weight_scale-len", {"weight_scale": torch.ones(4)}, ValueError, "weight_scale"),
    ("int8_scaled_mm", "", "weight_scale-fp16", {"weight_scale": torch.ones(5, dtype=torch.float16)}, TypeError, "weight_scale"),
    ("int8_scaled_mm", "", "bias-len", {"bias": torch.ones(6)}, ValueError, "bias"),
    ("int8_scaled_mm", "", "bias-2d", {"bias": torch.ones(1, 5)}, ValueError, "bias"),
    ("int8_scaled_mm", "", "row_stats-2d", {"row_stats": lambda a: a["row_stats"].reshape(1, -1)}, ValueError, "row_stats"),
    ("int8_scaled_mm", "", "bias-int", {"bias": torch.ones(5, dtype=torch.int64)}, TypeError, "bias"),
    ("int8_scaled_mm", "", "dtype-int", {"dtype": torch.int32}, ValueError, "dtype"),
    # int8_linear
    ("int8_linear", "", "weight-1d", {"weight": torch.ones(13, dtype=torch.int8)}, ValueError, "weight"),
    ("int8_linear", "", "weight-3d", {"weight": torch.ones(1, 5, 13, dtype=torch.int8)}, ValueError, "weight"),
    ("int8_linear", "", "weight-float", {"weight": torch.ones(5, 13)}, TypeError, "weight"),
    ("int8_linear", "", "weight_scale-len", {"weight_scale": torch.ones(6)}, ValueError, "weight_scale"),
    ("int8_linear", "", "weight_scale-2d", {"weight_scale": torch.ones(5, 1)}, ValueError, "weight_scale"),
    ("int8_linear", "", "weight_scale-device", {"weight_scale": lambda a: _meta(a["weight_scale"])}, ValueError, "weight_scale"),
    ("int8_linear", "", "threshold-neg", {"threshold": -0.5}, ValueError, "threshold"),
    ("int8_linear", "", "threshold-nan", {"threshold": float("nan")}, ValueError, "threshold"),
    ("int8_linear", "", "threshold-float32-zero", {"threshold": 1e-50}, ValueError, "rounds to 0"),
    ("int8_linear", "", "x-int", {"x": torch.ones(3, 13, dtype=torch.int32)}, TypeError, "x"),
    ("int8_linear", "", "x-int8", {"x": torch.ones(3, 13, dtype=torch.int8)}, TypeError, "x"),
    ("int8_linear", "", "x-lastdim", {"x": torch.ones(3, 14)}, ValueError, "x"),
    ("int8_linear", "", "x-device", {"x": lambda a: _meta(a["x"])}, ValueError, "x"),
    ("int8_linear", "", "bias-shape", {"bias": torch.ones(13)}, ValueError, "bias"),
    ("int8_linear", "", "bias-2d", {"bias": torch.ones(5, 1)}, ValueError, "bias"),
    ("int8_linear", "", "weight-no-in-features", {"weight": torch.ones(5, 0, dtype=torch.int8), "x": torch.ones(3, 0)}, ValueError, "weight"),
    ("int8_scaled_mm", "", "weight-no-in-features", {"weight": torch.ones(5, 0, dtype=torch.int8), "A": torch.ones(2, 3, 0, dtype=torch.int8)}, ValueError, "weight"),
    # adam8bit_step_
    ("adam8bit_step_", "", "lr-neg", {"lr": -1e-3}, ValueError, "lr"),
    ("adam8bit_step_", "", "lr-nan", {"lr": float("nan")}, ValueError, "lr"),
    ("adam8bit_step_", "", "beta1-one", {"beta1": 1.0}, ValueError, "beta1"),
    ("adam8bit_step_", "", "beta1-neg", {"beta1": -0.1}, ValueError, "beta1"),
    ("adam8bit_step_", "", "beta2-big", {"beta2": 1.5}, ValueError, "beta2"),
    ("adam8bit_step_", "", "beta2-nan", {"beta2": float("nan")}, ValueError, "beta2"),
    ("adam8bit_step_", "", "eps-neg", {"eps": -1e-8}, ValueError, "eps"),
    ("adam8bit_step_", "", "weight_decay-neg", {"weight_decay": -0.1}, ValueError, "weight_decay"),
    ("adam8bit_step_", "", "lr-inf", {"lr": float("inf")}, ValueError, "lr"),
    ("adam8bit_step_", "", "weight_decay-inf", {"weight_decay": float("inf")}, ValueError, "weight_decay"),
    ("adam8bit_step_", "", "gnorm_scale-nan", {"gnorm_scale": float("nan")}, ValueError, "gnorm_scale"),
    ("adam8bit_step_", "", "gnorm_scale-inf", {"gnorm_scale": float("inf")}, ValueError, "gnorm_scale"),
    ("adam8bit_step_", "", "gnorm_scale-neg", {"gnorm_scale": -1.0}, ValueError, "gnorm_scale"),
    ("adam8bit_step_", "", "blocksize-32", {"blocksize": 32}, ValueError, "blocksize"),
    ("adam8bit_step_", "", "blocksize-32-absmax-fits", {"blocksize": 32, "absmax1": torch.ones(10), "absmax2": torch.ones(10)}, ValueError, "blocksize"),
    ("adam8bit_step_", "", "blocksize-100", {"blocksize": 100, "absmax1": torch.ones(3), "absmax2": torch.ones(3)}, ValueError, "blocksize"),
    ("adam8bit_step_", "", "p-noncontiguous", {"p": _noncontig(300)}, ValueError, "p"),
    ("adam8bit_step_", "", "p-int", {"p": torch.ones(300, dtype=torch.int32)}, TypeError, "p"),
    ("adam8bit_step_", "", "p-empty", {"p": torch.empty(0), "g": torch.empty(0)}, ValueError, "p"),
    ("adam8bit_step_", "", "g-shape", {"g": torch.ones(299)}, ValueError, "g"),
    ("adam8bit_step_", "", "g-dtype", {"g": torch.ones(300, dtype=torch.float16)}, TypeError, "g"),
    ("adam8bit_step_", "", "g-device", {"g": lambda a: _meta(a["g"])}, ValueError, "g"),
    ("adam8bit_step_", "", "state1-size", {"state1": torch.zeros(299, dtype=torch.uint8)}, ValueError, "state1"),
    ("adam8bit_step_", "", "state1-dtype", {"state1": torch.zeros(300)}, TypeError, "state1"),
    ("adam8bit_step_", "", "state1-noncontiguous", {"state1": torch.zeros(300, 2, dtype=torch.uint8)[:, 0]}, ValueError, "state1"),
    ("adam8bit_step_", "", "state2-size", {"state2": torch.zeros(600, dtype=torch.uint8)}, ValueError, "state2"),
    ("adam8bit_step_", "", "state2-device", {"state2": lambda a: _meta(a["state2"])}, ValueError, "state2"),
    ("adam8bit_step_", "", "absmax1-size", {"absmax1": torch.ones(4)}, ValueError, "absmax1"),
    ("adam8bit_step_", "", "absmax2-dtype", {"absmax2": torch.ones(5, dtype=torch.float16)}, TypeError, "absmax2"),
    ("adam8bit_step_", "", "qmap1-size", {"qmap1": torch.zeros(16)}, ValueError, "qmap1"),
    ("adam8bit_step_", "", "qmap2-dtype", {"qmap2": torch.zeros(256, dtype=torch.float64)}, TypeError, "qmap2"),
    ("adam8bit_step_", "", "step-dtype", {"step": torch.tensor(3, dtype=torch.int64)}, TypeError, "step"),
    ("adam8bit_step_", "", "step-size", {"step": torch.zeros(2)}, ValueError, "step"),
    ("adam8bit_step_", "", "skipped-size", {"skipped": torch.zeros(2)}, ValueError, "skipped"),
    # adam8bit_multi_step_: the lists must match; each tensor is checked as adam8bit_step_'s
    ("adam8bit_multi_step_", "", "params-empty", {n: [] for n in _MULTI_NAMES}, ValueError, "params"),
    ("adam8bit_multi_step_", "", "grads-short", {"grads": lambda a: a["grads"][:1]}, ValueError, "grads"),
    ("adam8bit_multi_step_", "", "steps-long", {"steps": lambda a: a["steps"] * 2}, ValueError, "steps"),
    ("adam8bit_multi_step_", "", "state1-size", {"state1": lambda a: [a["state1"][0], a["state1"][0]]}, ValueError, "state1"),
    ("adam8bit_multi_step_", "", "lr-neg", {"lr": -1.0}, ValueError, "lr"),
    ("adam8bit_multi_step_", "", "gnorm_scale-inf", {"gnorm_scale": float("inf")}, ValueError, "gnorm_scale"),
    ("adam_multi_step_", "", "gnorm_scale-nan", {"gnorm_scale": float("nan")}, ValueError, "gnorm_scale"),
    ("adam_multi_step_", "", "params-empty", {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "steps": [], "skipped": []}, ValueError, "params"),
    ("adam_multi_step_", "", "exp_avgs-short", {"exp_avgs": lambda a: a["exp_avgs"][:1]}, ValueError, "exp_avgs"),
    ("adam_multi_step_", "", "p-noncontiguous", _second("params", _noncontig(70)), ValueError, "p"),
    ("adam_multi_step_", "", "p-int", _second("params", torch.ones(70, dtype=torch.int32)), TypeError, "p"),
    ("adam_multi_step_", "", "g-shape", _second("grads", torch.ones(69)), ValueError, "g"),
    ("adam_multi_step_", "", "g-dtype", _second("grads", torch.ones(70, dtype=torch.bfloat16)), TypeError, "g"),
    ("adam_multi_step_", "", "exp_avg-dtype", _second("exp_avgs", torch.zeros(70, dtype=torch.float16)), TypeError, "exp_avg"),
    ("adam_multi_step_", "", "exp_avg-size", _second("exp_avgs", torch.zeros(71)), ValueError, "exp_avg"),
    ("adam_multi_step_", "", "exp_avg_sq-noncontiguous", _second("exp_avg_sqs", torch.zeros(70, 2)[:, 0]), ValueError, "exp_avg_sq"),
    ("adam_multi_step_", "", "exp_avg_sq-device", _second("exp_avg_sqs", _meta), ValueError, "exp_avg_sq"),
    ("adam_multi_step_", "", "params-device", {n: (lambda a, n=n: [a[n][0], _meta(a[n][1])]) for n in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "skipped")}, ValueError, "params"),
    ("adam_multi_step_", "", "step-dtype", _second("steps", torch.tensor(3, dtype=torch.int64)), TypeError, "step"),
    ("adam_multi_step_", "", "skipped-size", _second("skipped", torch.zeros(2)), ValueError, "skipped"),
    ("adam_multi_step_", "", "beta2-one", {"beta2": 1.0}, ValueError, "beta2"),
]  # fmt: skip


def _apply(args: dict, changes: dict) -> dict:
    out = dict(args)
    for k, v in changes.items():
        out[k] = v(args) if callable(v) else v
    return out


def _adam_multi_with_bad_second(changes: dict) -> dict:
    """adam8bit_multi_step_'s arguments whose second tensor carries a bad input of
    adam8bit_step_ (the good one first)."""
    good, bad = _adam(70), _apply(_adam(300), changes)
    args = {k: v for k, v in bad.items() if k not in _PER_TENSOR}
    for single_name, multi_name in zip(_PER_TENSOR, _MULTI_NAMES):
        args[multi_name] = [good[single_name], bad[single_name]]
    return args


@pytest.mark.parametrize(
    ("op", "variant", "changes", "exc", "name"),
    [pytest.param(op, v, ch, exc, name, id=f"{op}-{i}") for op, v, i, ch, exc, name in BAD],
)
def test_bad_input(op, variant, changes, exc, name):
    args = _apply(valid_args(op, variant), changes)
    snapshot = {
        f"{k}[{i}]" if isinstance(v, list) else k: t.clone()
        for k, v in args.items()
        for i, t in (enumerate(v) if isinstance(v, list) else [(0, v)])
        if isinstance(t, torch.Tensor)
    }
    # The checker's messages read "lowprec.<op>: <argument> must ...", or name the argument
    # among those that must come together (double quant): the argument is named either way.
    with pytest.raises(exc, match=rf"lowprec\.{op}: .*\b{name}\b"):
        call(op, args)
    # A failed call writes nothing: in particular the optimizer state stays as it was.
    for k, before in snapshot.items():
        name, _, index = k.partition("[")
        now = args[name][int(index[:-1])] if index else args[name]
        if before.device.type != "meta":
            assert torch.equal(now, before), f"{k} modified by a failed call"


@pytest.mark.parametrize("blocksize", [256.0, True, torch.tensor(256)],
                         ids=["float", "bool", "tensor"])  # fmt: skip
def test_a_blocksize_that_is_no_int_is_refused_by_name(device_backend, blocksize):
    """The functional API checks arguments itself (the eager path skips the schemas): a
    blocksize equal to an allowed one but not an int (64.0 == 64) is refused there, not
    passed to kernels that index with it."""
    device, backend = device_backend
    x = torch.randn(512, device=device)
    with lpk.use_backend(backend), pytest.raises(TypeError, match="blocksize must be an int"):
        LF.quantize_blockwise(x, blocksize=blocksize)
    with lpk.use_backend(backend), pytest.raises(TypeError, match="blocksize must be an int"):
        LF.quantize_4bit(x, blocksize=blocksize)


def test_a_numpy_integer_blocksize_is_an_int(device_backend):
    """NumPy integers (a blocksize read from an array or a config) are taken as ints, on every
    backend, with the same results."""
    device, backend = device_backend
    x = torch.randn(512, device=device)
    with lpk.use_backend(backend):
        q, absmax = LF.quantize_blockwise(x, blocksize=np.int64(256))
        assert torch.equal(q, LF.quantize_blockwise(x, blocksize=256)[0])
        assert torch.equal(LF.dequantize_blockwise(q, absmax, blocksize=np.int32(256)),
                           LF.dequantize_blockwise(q, absmax, blocksize=256))  # fmt: skip
        qw, st = LF.quantize_4bit(x, blocksize=np.int64(64))
        assert st.blocksize == 64 and type(st.blocksize) is int


_ADAM_BAD = [(i, ch, exc, name) for op, _, i, ch, exc, name in BAD if op == "adam8bit_step_"]


@pytest.mark.parametrize(("changes", "exc", "name"), [pytest.param(ch, exc, name, id=i) for i, ch, exc, name in _ADAM_BAD])  # fmt: skip
def test_multi_step_refuses_each_bad_tensor(changes, exc, name):
    """adam8bit_multi_step_ screens each tensor with one fast expression and runs the checks
    that name the argument only when it fails: every bad input of adam8bit_step_, as the
    second of two tensors, is still refused, naming the argument, before anything is written."""
    args = _adam_multi_with_bad_second(changes)
    before = args["params"][0].clone()
    with pytest.raises(exc, match=rf"lowprec\.adam8bit_multi_step_: .*\b{name}\b"):
        call("adam8bit_multi_step_", args)
    assert torch.equal(args["params"][0], before)


def test_bad_table_names_every_adam_scalar():
    named = {name for op, *_, name in BAD if op == "adam8bit_step_"}
    assert {"lr", "beta1", "beta2", "eps", "weight_decay", "gnorm_scale", "blocksize"} <= named


# ---------------------------------------------------------------- functional-level checks


def _state_with(st: lpk.QuantState, **changes) -> lpk.QuantState:
    fields = dict(
        quant_type=st.quant_type, blocksize=st.blocksize, shape=st.shape, dtype=st.dtype,
        absmax=st.absmax, code=st.code, nested_absmax=st.nested_absmax,
        nested_code=st.nested_code, nested_blocksize=st.nested_blocksize, offset=st.offset,
    )  # fmt: skip
    fields.update(changes)
    return lpk.QuantState(**fields)


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"shape": (10, 999)}, "A"),
        ({"shape": (9, 1000)}, "A"),
        ({"shape": (1000, 10)}, "x"),  # same numel and blocks: only the matmul can tell
        ({"blocksize": 64}, "absmax"),
        ({"blocksize": 16}, "blocksize"),
        ({"absmax": torch.ones(312, dtype=torch.uint8)}, "absmax"),
        ({"nested_absmax": torch.ones(3)}, "nested_absmax"),
        ({"nested_blocksize": 64}, "nested_absmax"),  # 313 codes need 5 blocks of 64, not 2
        ({"nested_blocksize": 100}, "nested_blocksize"),
    ],
    ids=[
        "shape", "rows", "transposed", "blocksize-mismatch", "blocksize-16", "absmax-len",
        "nested-len", "nested-bs-mismatch", "nested-bs-100",
    ],
)  # fmt: skip
@pytest.mark.parametrize("fn", ["dequantize_4bit", "matmul_4bit"])
def test_mismatched_quant_state(fn, changes, name):
    # 10 x 1000 at blocksize 32: 313 absmax codes (the last block partial), 2 nested blocks
    qw, st = _fourbit((10, 1000), 32, "nf4", double_quant=True)
    assert st.absmax.numel() == 313 and st.nested_absmax.numel() == 2
    bad = _state_with(st, **changes)
    if fn == "dequantize_4bit":
        if name == "x":
            assert LF.dequantize_4bit(qw, bad).shape == (1000, 10)  # a valid reshape
            return
        with pytest.raises(ValueError, match=rf"lowprec\.{fn}: .*\b{name}\b"):
            LF.dequantize_4bit(qw, bad)
    else:
        with pytest.raises(ValueError, match=rf"lowprec\.{fn}: .*\b{name}\b"):
            LF.matmul_4bit(randn_nonzero(2, 1000), qw, bad)


@pytest.mark.parametrize("fn", ["dequantize_4bit", "matmul_4bit"])
def test_quant_state_of_wrong_type(fn):
    qw, st = _fourbit()
    with pytest.raises(TypeError, match="quant_state"):
        if fn == "dequantize_4bit":
            LF.dequantize_4bit(qw, st.as_dict())
        else:
            LF.matmul_4bit(randn_nonzero(2, 33), qw, st.as_dict())


def test_quant_state_constructor_checks():
    qw, st = _fourbit()
    with pytest.raises(ValueError, match="quant_type"):
        _state_with(st, quant_type="int4")
    with pytest.raises(TypeError, match="dtype"):
        _state_with(st, dtype=torch.int8)
    with pytest.raises(ValueError, match="nested_absmax"):
        _state_with(st, nested_absmax=torch.ones(1))


@pytest.mark.parametrize("bad_step", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("op", ["adam8bit_step_", "adam8bit_multi_step_", "adam_multi_step_"])
def test_adam_step_count_must_be_finite_and_not_negative(op, backend, bad_step):
    """A step the host reads (t = int(step) + 1) that is negative or not finite is refused,
    naming it, before anything is written: the CPU kernels made every parameter NaN, the
    reference failed with unrelated errors. (Devices' steps stay on the device, unchecked.)"""
    if not lpk.available_backends()[backend]:
        pytest.skip(f"no {backend} backend")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter")
    args = valid_args(op, "")
    steps = args["steps"] if "steps" in args else [args["step"]]
    steps[-1].fill_(bad_step)  # the last tensor's: the first must stay unwritten too
    snapshot = {
        name: [t.clone() for t in (v if isinstance(v, list) else [v])]
        for name, v in args.items()
        if isinstance(v, torch.Tensor) or (isinstance(v, list) and isinstance(v[0], torch.Tensor))
    }
    with lpk.use_backend(backend), pytest.raises(ValueError, match="step"):
        call(op, args)
    for name, before in snapshot.items():
        now = args[name] if isinstance(args[name], list) else [args[name]]
        for a, b in zip(now, before):  # bit for bit, the NaN step included
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def test_functional_adam_failure_leaves_state_untouched():
    a = _adam()
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    kw = {k: a[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "blocksize")}
    tensors = [a[k] for k in arg_names("adam8bit_step_")[:10]]
    with pytest.raises(ValueError, match="beta2"):
        LF.adam8bit_step_(*tensors, **{**kw, "beta2": 1.0})
    for k, v in before.items():
        assert torch.equal(a[k], v), k


# ---------------------------------------------------------------- backends


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match="name"), lpk.use_backend("fortran"):
        pass


def test_use_backend_unavailable(monkeypatch):
    monkeypatch.setitem(_dispatch._AVAILABLE, "cuda", False)
    with pytest.raises(RuntimeError, match="cuda"), lpk.use_backend("cuda"):
        pass


def test_use_backend_reference_always_available():
    assert lpk.available_backends()["reference"] is True
    with lpk.use_backend("reference"):
        assert _dispatch.active_backend() == "reference"
        assert _dispatch.kernel_for("int8_linear", "cpu")[0] == "reference"
    assert _dispatch.active_backend() is None


def test_forced_backend_without_kernel_falls_back_to_reference(monkeypatch):
    """A forced, available backend with a kernel for one op only: that op runs it, every
    other op falls back to reference. Registration is test-local (monkeypatched tables)."""
    calls = []

    def dummy_quantize_weight(W):
        calls.append(W.shape)
        return torch.zeros(W.shape, dtype=torch.int8), torch.ones(W.shape[0])

    # A pretend "cuda" backend for CPU tensors: available, no kernels but the dummy one.
    kernels = {k: v for k, v in _dispatch._KERNELS.items() if k[1] != "cuda"}
    kernels[("int8_quantize_weight", "cuda")] = {"cpu": dummy_quantize_weight}
    monkeypatch.setattr(_dispatch, "_KERNELS", kernels)
    monkeypatch.setitem(_dispatch._AVAILABLE, "cuda", True)

    W = randn_nonzero(4, 9)
    x = randn_nonzero(3, 70)
    with lpk.use_backend("cuda"):
        assert _dispatch.kernel_for("int8_quantize_weight", "cpu")[0] == "cuda"
        assert _dispatch.kernel_for("quantize_blockwise", "cpu")[0] == "reference"
        q, s = LF.int8_quantize_weight(W)
        qb, ab = LF.quantize_blockwise(x, blocksize=64)
    assert calls == [torch.Size([4, 9])]
    assert q.eq(0).all() and s.eq(1).all(), "the forced backend's kernel ran"
    with lpk.use_backend("reference"):
        qb_ref, ab_ref = LF.quantize_blockwise(x, blocksize=64)
        q_ref, _ = LF.int8_quantize_weight(W)
    assert torch.equal(qb, qb_ref) and torch.equal(ab, ab_ref), "fallback is the reference"
    assert not q_ref.eq(0).all()
    # The checks run before any backend kernel, forced or not.
    with lpk.use_backend("cuda"), pytest.raises(ValueError, match="W"):
        LF.int8_quantize_weight(torch.ones(3))
    assert len(calls) == 1


def test_register_kernel_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.register_kernel("int8_linear", "opencl")


# ------------------------------------------------------- eager calls past the dispatcher


@pytest.fixture
def router_spy(monkeypatch):
    """Records the calls of matmul_4bit that skip the dispatcher (one per call: the eager
    entry takes it, or the router when there is none)."""
    return spy_on_router(monkeypatch, "matmul_4bit")


def _matmul_4bit_inputs(requires_grad=False):
    qw, st = LF.quantize_4bit(torch.randn(24, 64), 64)
    x = torch.randn(3, 64, requires_grad=requires_grad)
    return x, qw, st


def test_plain_eager_call_skips_the_dispatcher(router_spy):
    x, qw, st = _matmul_4bit_inputs()
    y = LF.matmul_4bit(x, qw, st)
    assert len(router_spy) == 1
    assert torch.equal(y, torch.ops.lowprec.matmul_4bit(x, qw, *st.op_args(), None))


def test_jit_trace_records_the_op(router_spy):
    """torch.jit.trace sees only what passes the dispatcher: a traced call must not skip it."""
    x, qw, st = _matmul_4bit_inputs()
    traced = torch.jit.trace(lambda x: LF.matmul_4bit(x, qw, st), (x,), check_trace=False)
    assert router_spy == []
    assert "lowprec::matmul_4bit" in str(traced.graph)
    assert torch.equal(traced(x), LF.matmul_4bit(x, qw, st))


@pytest.mark.skipif(lpk._C is None, reason="needs the native extension")
def test_native_state_check_agrees_with_python():
    """_C.dispatcher_has_work (the fast form) and _ops._state_has_work under each state that
    gives torch's dispatcher work, and with none."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from lowprec_kernels import _ops

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class PassingFunction(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(3, 4), torch.randn(4, requires_grad=True)
    seen = []

    def both(tensors):
        seen.append((_ops._state_has_work(tensors), lpk._C.dispatcher_has_work(tensors)))
        return tensors[0]

    both([x])  # nothing: False
    both([x, w])  # a tensor needing grad
    with torch.no_grad():
        both([x, w])  # ... but no grad mode: False
    both([x.to("meta")])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both([x])
    with torch.autograd.profiler.profile():
        both([x])
    with PassingFunction():
        both([x])
    with Passing():
        both([x])
    torch.func.vmap(lambda row: both([row]))(x)
    torch.jit.trace(lambda t: both([t]), (x,), check_trace=False)
    both([x, torch._neg_view(x)])  # its data is -x's: the dispatcher negates it first
    both([torch.randn(3, dtype=torch.complex64).conj()])
    python, native = zip(*seen)
    assert native == python
    assert python[:3] == (False, True, False) and all(python[3:])


def test_calls_that_need_the_dispatcher_go_through_it(router_spy):
    from lowprec_kernels import _ops

    x, qw, st = _matmul_4bit_inputs(requires_grad=True)
    y = LF.matmul_4bit(x, qw, st)  # autograd
    assert y.grad_fn is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts x
        assert LF.matmul_4bit(x.detach(), qw, st).dtype == torch.bfloat16
    args = (x.detach(), qw, *st.op_args(), None)
    with FakeTensorMode() as mode:  # dispatch modes
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert _ops.call("matmul_4bit", *fake_args).shape == (3, 24)
    meta = LF.matmul_4bit(x.detach().to("meta"), qw.to("meta"), st.to("meta"))  # meta
    assert meta.shape == (3, 24)
    assert router_spy == []
    with torch.no_grad():  # no grad needed: past the dispatcher again
        LF.matmul_4bit(x, qw, st)
    assert len(router_spy) == 1


# The eager entries: one native call for the whole plain eager op, checked against the router.

_EAGER_SHAPES = [(1, 64), (3, 64), (2, 3, 64), (17, 64), (0, 64), (6, 96)]


def _eager_matmul_4bit(device: str):
    """The matmul_4bit eager entry that a plain call on ``device`` takes (its native backend
    must be there: every native backend that runs matmul_4bit has one)."""
    from lowprec_kernels import _dispatch

    if not lpk.available_backends()[device]:
        pytest.skip(f"needs the native {device} backend")
    eager = _dispatch.eager_for("matmul_4bit", device)
    assert eager is not None
    return eager


@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-absmax", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_entry_matches_the_router(device, dtype, double_quant):
    """Every path of the matmul_4bit eager entry (GEMV and GEMM rows, leading dims, no rows,
    bias, strided x) gives the router's result bit for bit, poisoned output included. The CUDA
    entry takes the GEMV's rows only and declines more."""
    from lowprec_kernels import _ops
    from lowprec_kernels.backends import cuda as cuda_backend

    eager = _eager_matmul_4bit(device)
    for x_shape in _EAGER_SHAPES:
        k = x_shape[-1]
        qw, st = LF.quantize_4bit(randn_nonzero(10, k).to(device), 32, "nf4", double_quant)
        x = randn_nonzero(*x_shape, dtype=dtype).to(device)
        rows = x.numel() // k
        for bias in (None, randn_nonzero(10, dtype=dtype).to(device)):
            strided = randn_nonzero(*x_shape[:-1], 2 * k, dtype=dtype).to(device)[..., ::2]
            for x_in in (x, strided):
                args = (x_in, qw, *st.op_args(), bias)
                got = eager(*args)
                if device == "cuda" and rows > cuda_backend.GEMV_MAX_ROWS:
                    assert got is None, x_shape
                    continue
                want = _ops._ROUTERS["matmul_4bit"](*args)
                assert got is not None, (x_shape, bias is not None)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got, want), (x_shape, bias is not None, x_in.is_contiguous())


def test_eager_entries_can_be_turned_off(monkeypatch):
    """LOWPREC_EAGER=0 (read at import; here its flag): plain eager calls take the router."""
    from lowprec_kernels import _dispatch, _ops

    routed = []
    route = _ops._ROUTERS["matmul_4bit"]
    monkeypatch.setitem(
        _ops._ROUTERS, "matmul_4bit", lambda *args: routed.append(args) or route(*args)
    )
    x, qw, st = _matmul_4bit_inputs()
    LF.matmul_4bit(x, qw, st)
    assert routed == [] or not lpk.available_backends()["cpu"]  # the eager entry took it
    monkeypatch.setattr(_dispatch, "_EAGER_ENABLED", False)
    assert _dispatch.eager_for("matmul_4bit", "cpu") is None
    LF.matmul_4bit(x, qw, st)
    assert len(routed) == 1 + (not lpk.available_backends()["cpu"])


def _matmul_bad_weights():
    """The bad inputs of the table for matmul_4bit, and its dequantize_4bit rows that concern
    the weight (the same checker, check_4bit_weight), applied to matmul_4bit."""
    for op, variant, ident, changes, exc, name in BAD:
        if op == "matmul_4bit" or (op == "dequantize_4bit" and "dtype" not in changes):
            yield pytest.param(variant, changes, exc, name, id=f"{op}-{ident}")


@pytest.mark.parametrize(("variant", "changes", "exc", "name"), list(_matmul_bad_weights()))
def test_eager_entry_declines_what_the_checker_rejects(device, variant, changes, exc, name):
    """The entry's native conditions cover the checker's: it declines every bad input (so
    that the checker reports it, through ``_ops.call``)."""
    from lowprec_kernels import _ops

    eager = _eager_matmul_4bit(device)
    args = _apply(valid_args("matmul_4bit", variant), changes)
    ordered = [
        a.to(device) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a
        for a in (args[n] for n in arg_names("matmul_4bit"))
    ]
    assert eager(*ordered) is None
    if ordered[0].device.type == device:
        with pytest.raises(exc, match=rf"lowprec\.matmul_4bit: .*\b{name}\b"):
            _ops.call("matmul_4bit", *ordered)


# The optimizers' eager entries (adam8bit_multi_step_, adam_multi_step_), taken through
# _ops.route_mutating: the same contract, on the CPU.


def _adam_eager(op: str):
    from lowprec_kernels import _dispatch

    if not lpk.available_backends()["cpu"]:
        pytest.skip("needs the native cpu backend")
    eager = _dispatch.eager_for(op, "cpu")
    assert eager is not None
    return eager


def _adam_bad_rows():
    for op, _, ident, changes, *_ in BAD:
        if op in ("adam8bit_step_", "adam8bit_multi_step_", "adam_multi_step_"):
            yield pytest.param(op, changes, id=f"{op}-{ident}")


@pytest.mark.parametrize(("op", "changes"), list(_adam_bad_rows()))
def test_adam_eager_entries_decline_what_the_checker_rejects(op, changes):
    """Every bad input of the checker's table (a bad adam8bit_step_ input as the second tensor
    of a multi-step) is declined, with nothing written, so that the checker reports it."""
    if op == "adam8bit_step_":
        op, args = "adam8bit_multi_step_", _adam_multi_with_bad_second(changes)
    else:
        args = _apply(valid_args(op), changes)
    ordered = [args[n] for n in arg_names(op)]
    tensors = [t for a in ordered for t in (a if isinstance(a, list) else [a])]
    before = [t.clone() for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    assert not _adam_eager(op)(*ordered)
    after = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("op", ["adam8bit_multi_step_", "adam_multi_step_"])
def test_adam_eager_entries_match_the_router(op):
    """On valid arguments the entry steps, and gives the router's tensors bit for bit."""
    from lowprec_kernels import _ops

    args = valid_args(op)
    ordered = [args[n] for n in arg_names(op)]

    def copy(a):
        if isinstance(a, list):
            return [t.clone() for t in a]
        return a.clone() if isinstance(a, torch.Tensor) else a

    def tensors(args):
        return [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]  # fmt: skip

    via_eager, via_router = [copy(a) for a in ordered], [copy(a) for a in ordered]
    assert _adam_eager(op)(*via_eager) is True
    _ops._ROUTERS[op](*via_router)
    for got, want in zip(tensors(via_eager), tensors(via_router)):
        assert torch.equal(got, want)
    assert not torch.equal(via_eager[0][0], ordered[0][0])  # it did step


@pytest.mark.parametrize("op", ["adam8bit_multi_step_", "adam_multi_step_"])
def test_adam_eager_entries_take_plain_numbers_only(op):
    """pybind would turn other numbers into floats or ints before the native checks, where the
    Python checks compare them as they are: the entries decline them."""
    from decimal import Decimal

    for name, value in [("lr", Decimal("1e-3")), ("beta1", torch.tensor(0.9)), ("eps", 0)]:
        args = valid_args(op) | {name: value}
        assert _adam_eager(op)(*[args[n] for n in arg_names(op)]) is None, name
    if op == "adam8bit_multi_step_":
        args = valid_args(op) | {"blocksize": 64.0}
        assert _adam_eager(op)(*[args[n] for n in arg_names(op)]) is None


@pytest.mark.parametrize("op", ["adam8bit_multi_step_", "adam_multi_step_"])
def test_adam_eager_entries_take_strided_gradients(op):
    """A transposed parameter's gradient (strided) is stepped from a contiguous copy, as the
    router's kernels do."""
    from lowprec_kernels import _ops

    args = valid_args(op)
    args["params"][0] = randn_nonzero(20, 15)
    args["grads"][0] = randn_nonzero(15, 20).t()
    states = ("state1", "state2") if op == "adam8bit_multi_step_" else ("exp_avgs", "exp_avg_sqs")
    for name in states:
        args[name][0] = args[name][0].reshape(20, 15)
    ordered = [args[n] for n in arg_names(op)]
    via_eager = [[t.clone() for t in a] if isinstance(a, list) else a for a in ordered]
    via_router = [[t.clone() for t in a] if isinstance(a, list) else a for a in ordered]
    assert _adam_eager(op)(*via_eager) is True
    _ops._ROUTERS[op](*via_router)
    assert torch.equal(via_eager[0][0], via_router[0][0])

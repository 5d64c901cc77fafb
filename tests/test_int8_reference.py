"""LLM.int8 reference: weight/activation codes by hand, outlier columns, NaN/Inf, GEMM, autograd.

Everything here runs on the ``reference`` backend: it pins the definition that every other
backend is later compared against.
"""

import math

import pytest
import torch
from conftest import noncontiguous, run_on

from lowprec_kernels import functional as LF
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ref(fn, *args, **kwargs):
    return run_on("reference", fn, *args, **kwargs)


def randn_nonzero(*shape, scale=1.0, dtype=torch.float32):
    x = torch.randn(*shape) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


def documented_codes(X: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The docstring's rule, written out: rint(x * (127 / absmax)) in float32, NaN -> 0."""
    scale = torch.tensor(127.0) / absmax.float().unsqueeze(1)
    q = torch.round(X.float() * scale)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q).clamp(-127, 127)
    return q.to(torch.int8)


def w_deq64(wq, w_scale):
    return wq.double() * w_scale.double().unsqueeze(1) / 127.0


# ---------------------------------------------------------------- int8_quantize_weight


def test_quantize_weight_hand_cases():
    W = torch.tensor(
        [
            [127.0, 0.5, 1.5, 2.5, -0.5, -2.5],  # absmax 127: scale 1, halves to even
            [254.0, 5.0, 3.0, -1.0, 127.0, -254.0],  # scale 0.5: 2.5->2, 1.5->2, -0.5->-0, 63.5->64
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a zero row: codes 0, scale 0
            [1.0, -0.5, 0.25, 2.0, 0.75, -1.25],  # scale 63.5: 63.5->64, -31.75, 15.875, ...
        ]
    )
    q, s = ref(LF.int8_quantize_weight, W)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.tolist() == [127.0, 254.0, 0.0, 2.0]
    assert q.tolist() == [
        [127, 0, 2, 2, 0, -2],
        [127, 2, 2, 0, 64, -127],
        [0, 0, 0, 0, 0, 0],
        [64, -32, 16, 127, 48, -79],
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (33, 65)])
def test_quantize_weight_random(shape, dtype):
    W = randn_nonzero(*shape, dtype=dtype)
    q, s = ref(LF.int8_quantize_weight, W)
    absmax = W.float().abs().amax(1)
    assert torch.equal(s, absmax), "quantized as given: the absmax of the dtype's own values"
    assert torch.equal(q, documented_codes(W, absmax))
    # Within one code (only at a rounding tie of the fp32 scale) of round(127 w / absmax).
    exact = torch.round(127.0 * W.double() / absmax.double().unsqueeze(1))
    assert (q.double() - exact).abs().max().item() <= 1
    assert q.abs().amax(1).eq(127).all(), "each row's largest element codes to +-127"


def test_quantize_weight_noncontiguous():
    W = randn_nonzero(5, 12)
    q, s = ref(LF.int8_quantize_weight, noncontiguous(W))
    q2, s2 = ref(LF.int8_quantize_weight, W)
    assert torch.equal(q, q2) and torch.equal(s, s2)


# ---------------------------------------------------------------- int8_vectorwise_quant


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3), (2, 1, 3)])
def test_vectorwise_threshold_zero(lead, dtype):
    x = randn_nonzero(*lead, 45, scale=10.0, dtype=dtype)
    q, rs, cols = ref(LF.int8_vectorwise_quant, x, 0.0)
    assert q.shape == x.shape and q.dtype == torch.int8
    X = x.reshape(-1, 45).float()
    assert rs.shape == (X.shape[0],) and rs.dtype == torch.float32
    assert torch.equal(rs, X.abs().amax(1))
    assert torch.equal(q.reshape(-1, 45), documented_codes(X, rs))
    assert cols.dtype == torch.int64 and cols.shape == (0,), "threshold 0: no outliers"


def test_vectorwise_outlier_columns_are_whole_columns():
    x = randn_nonzero(5, 12)
    x = x.clamp(-3, 3)
    x[2, 7] = 6.0  # exactly the threshold: an outlier (>=)
    x[0, 3] = -25.0
    x[4, 3] = 40.0
    x[1, 10] = torch.nextafter(torch.tensor(6.0), torch.tensor(0.0)).item()  # just below
    q, rs, cols = ref(LF.int8_vectorwise_quant, x, 6.0)
    assert cols.dtype == torch.int64 and cols.tolist() == [3, 7], "sorted, each column once"
    assert q[:, [3, 7]].eq(0).all(), "every row of an outlier column is zeroed"
    inner = x.index_fill(1, cols, 0.0)
    assert torch.equal(rs, inner.abs().amax(1)), "row absmax over non-outlier columns only"
    assert torch.equal(q, documented_codes(inner, rs))
    assert q[1, 10].abs().item() == 127, "column 10 stays in the int8 part"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 3)])
def test_vectorwise_threshold_random(lead, dtype):
    x = randn_nonzero(*lead, 64, dtype=dtype)
    X = x.reshape(-1, 64)
    planted = [5, 17, 60]
    for j, row in zip(planted, [0, -1, X.shape[0] // 2]):
        X[row, j] = 20.0 + 10 * j / 7
    x = X.view_as(x)
    q, rs, cols = ref(LF.int8_vectorwise_quant, x, 6.0)
    want = torch.nonzero((X.float().abs() >= 6.0).any(0)).view(-1)
    assert set(planted) <= set(cols.tolist())
    assert torch.equal(cols, want)
    inner = X.float().index_fill(1, cols, 0.0)
    assert torch.equal(rs, inner.abs().amax(1))
    assert torch.equal(q.reshape(-1, 64), documented_codes(inner, rs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorwise_no_outliers_is_empty_not_none(dtype):
    x = randn_nonzero(3, 20, dtype=dtype).clamp(-2, 2)
    q, rs, cols = ref(LF.int8_vectorwise_quant, x, 6.0)
    assert cols is not None and cols.shape == (0,) and cols.dtype == torch.int64
    q0, rs0, _ = ref(LF.int8_vectorwise_quant, x, 0.0)
    assert torch.equal(q, q0) and torch.equal(rs, rs0)


def test_vectorwise_noncontiguous():
    x = randn_nonzero(7, 30)
    x[3, 4] = 9.0
    out = ref(LF.int8_vectorwise_quant, noncontiguous(x), 6.0)
    want = ref(LF.int8_vectorwise_quant, x, 6.0)
    assert all(torch.equal(a, b) for a, b in zip(out, want))


# ---------------------------------------------------------------- NaN / Inf (reference/int8.py)


@pytest.fixture
def weight():
    W = randn_nonzero(9, 8)
    return ref(LF.int8_quantize_weight, W)


def test_nan_is_never_an_outlier(weight):
    x = randn_nonzero(4, 8).clamp(-2, 2)
    x[1, 2] = float("nan")
    _, rs, cols = ref(LF.int8_vectorwise_quant, x, 6.0)
    assert 2 not in cols.tolist() and cols.numel() == 0
    # "a row holding a NaN gets a NaN absmax and its output row is NaN"
    assert math.isnan(rs[1].item()) and rs[[0, 2, 3]].isfinite().all()
    y = ref(LF.int8_linear, x, *weight, None, 6.0)
    assert y[1].isnan().all()
    assert y[[0, 2, 3]].isfinite().all()


def test_nan_row_with_threshold_zero(weight):
    x = randn_nonzero(3, 8)
    x[0, 5] = float("nan")
    q, rs, _ = ref(LF.int8_vectorwise_quant, x, 0.0)
    assert math.isnan(rs[0].item()) and q[0].eq(0).all(), "codes of a NaN row are 0"
    y = ref(LF.int8_linear, x, *weight, None, 0.0)
    assert y[0].isnan().all() and y[1:].isfinite().all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_is_an_outlier_when_threshold_positive(weight, sign):
    x = randn_nonzero(4, 8).clamp(-2, 2)
    x[2, 4] = sign * float("inf")
    q, rs, cols = ref(LF.int8_vectorwise_quant, x, 6.0)
    assert cols.tolist() == [4]
    assert rs.isfinite().all() and q[:, 4].eq(0).all()
    # "it reaches its output row through the 16-bit term (inf or NaN)"
    y = ref(LF.int8_linear, x, *weight, None, 6.0)
    assert not y[2].isfinite().any()
    assert y[[0, 1, 3]].isfinite().all()


def test_inf_with_threshold_zero_gives_inf_absmax_and_nan_row(weight):
    x = randn_nonzero(4, 8)
    x[3, 1] = float("inf")
    q, rs, cols = ref(LF.int8_vectorwise_quant, x, 0.0)
    assert cols.numel() == 0
    assert rs[3].item() == float("inf") and q[3].eq(0).all()
    y = ref(LF.int8_linear, x, *weight, None, 0.0)
    assert y[3].isnan().all(), "an infinite absmax gives a NaN output row"
    assert y[:3].isfinite().all()


def test_weight_nan_and_inf_rows():
    W = torch.tensor([[1.0, float("nan")], [float("inf"), 1.0], [2.0, -1.0]])
    q, s = ref(LF.int8_quantize_weight, W)
    assert math.isnan(s[0].item()) and s[1].item() == float("inf")
    assert q[:2].eq(0).all(), "a NaN or infinite absmax codes its row as 0"
    assert q[2].tolist() == [127, -64]  # -63.5 -> -64 (half to even)


# ---------------------------------------------------------------- int8_scaled_mm


def _assert_within(y, y64, bound):
    err = (y.double() - y64).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3)])
def test_scaled_mm_vs_float64(lead, dtype, bias):
    K, N = 70, 23
    A = torch.randint(-127, 128, (*lead, K), dtype=torch.int8)
    rs = torch.rand(math.prod(lead)) * 5 + 0.1
    W = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    ws = torch.rand(N) * 3 + 0.1
    b = randn_nonzero(N, dtype=dtype) if bias else None
    y = ref(LF.int8_scaled_mm, A, rs, W, ws, b, dtype)
    assert y.dtype == dtype and y.shape == (*lead, N)
    A2 = A.reshape(-1, K).double()
    y64 = (A2 @ W.double().T) * rs.double().unsqueeze(1) * ws.double() / 127**2
    if bias:
        y64 = y64 + b.double()
    y64 = y64.view(*lead, N)
    # The int8 products sum exactly; the only error is the final rounding into dtype
    # (one unit roundoff), plus float64 noise in the scale multiply (1e-12 relative).
    u = UNIT_ROUNDOFF[dtype]
    sub = 2.0**-25 if dtype == torch.float16 else 0.0
    _assert_within(y, y64, (u + 1e-12) * y64.abs() + sub)


def test_scaled_mm_default_dtype_is_fp16():
    A = torch.randint(-127, 128, (2, 8), dtype=torch.int8)
    W = torch.randint(-127, 128, (3, 8), dtype=torch.int8)
    y = ref(LF.int8_scaled_mm, A, torch.ones(2), W, torch.ones(3))
    assert y.dtype == torch.float16


# ---------------------------------------------------------------- int8_linear


def _planted(lead, K, dtype, cols=(3, 40, 41)):
    """Activations within +-3 except columns ``cols`` with magnitudes 20..60."""
    x = randn_nonzero(*lead, K).clamp(-3, 3)
    X = x.view(-1, K)
    mags = torch.linspace(20, 60, len(cols))
    for j, m in zip(cols, mags.tolist()):
        X[:, j] = X[:, j].sign() * m * (0.5 + torch.rand(X.shape[0]) / 2).clamp(min=20 / m)
    return x.to(dtype)


def _quant_error_bound(x, wq, ws, threshold):
    """|y - x @ W_deq.T| for the reference: each non-outlier activation is off by at most
    half a code step (row_absmax / 254, plus fp32 rounding of x * 127/absmax), times
    sum_j |W_deq[o, j]| over the non-outlier columns; the outlier columns are exact."""
    _, rs, cols = ref(LF.int8_vectorwise_quant, x, threshold)
    Wd = w_deq64(wq, ws).abs()
    if cols.numel():
        Wd = Wd.index_fill(1, cols, 0.0)
    step = rs.double().unsqueeze(1) / 254.0 * (1 + 1e-5)
    return (step @ Wd.sum(1, keepdim=True).T).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3)])
def test_int8_linear_outliers_vs_float64(lead, dtype):
    K, N = 64, 24
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    x = _planted(lead, K, dtype)
    b = randn_nonzero(N, dtype=dtype)
    W = w_deq64(wq, ws)
    y64 = x.double() @ W.T + b.double()
    y6 = ref(LF.int8_linear, x, wq, ws, b, 6.0)
    y0 = ref(LF.int8_linear, x, wq, ws, b, 0.0)
    assert y6.dtype == dtype and y0.dtype == dtype and y6.shape == (*lead, N)
    u = UNIT_ROUNDOFF[dtype]
    for y, thr in ((y6, 6.0), (y0, 0.0)):
        q = _quant_error_bound(x, wq, ws, thr)
        _assert_within(y, y64, (1 + u) * q + u * y64.abs() + 2.0**-24)
    # The reason LLM.int8 exists: keeping the outlier columns out of the int8 part shrinks
    # every row's absmax from ~60 to ~3, and the error with it.
    err6 = (y6.double() - y64).norm().item()
    err0 = (y0.double() - y64).norm().item()
    # Measured ratio ~16-21 (fp32/fp16) and ~9 (bf16, whose own rounding of |y| ~ 100 adds
    # to both errors); 4 leaves room for other seeds.
    assert err6 * 4 < err0, (err6, err0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_without_outliers_thresholds_agree(dtype, bias):
    K, N = 50, 13
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    x = randn_nonzero(17, K, dtype=dtype).clamp(-5.5, 5.5)
    b = randn_nonzero(N, dtype=dtype) if bias else None
    y6 = ref(LF.int8_linear, x, wq, ws, b, 6.0)
    y0 = ref(LF.int8_linear, x, wq, ws, b, 0.0)
    assert torch.equal(y6, y0)
    # ... and both equal the int8 GEMM on the vectorwise codes
    xq, rs, _ = ref(LF.int8_vectorwise_quant, x, 0.0)
    assert torch.equal(y0, ref(LF.int8_scaled_mm, xq, rs, wq, ws, b, dtype))


def test_int8_linear_noncontiguous():
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(6, 20))
    x = _planted((3,), 20, torch.float32, cols=(4,))
    y = ref(LF.int8_linear, noncontiguous(x), wq, ws, None, 6.0)
    assert torch.equal(y, ref(LF.int8_linear, x, wq, ws, None, 6.0))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 3)])
def test_int8_linear_autograd(lead, dtype, threshold):
    K, N = 40, 21
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    x = _planted(lead, K, dtype, cols=(7,)).requires_grad_()
    b = randn_nonzero(N, dtype=dtype).requires_grad_()
    y = ref(LF.int8_linear, x, wq, ws, b, threshold)
    gy = randn_nonzero(*y.shape, dtype=dtype)
    y.backward(gy)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert b.grad.dtype == dtype and b.grad.shape == (N,)
    W = w_deq64(wq, ws)
    g64 = gy.double()
    # grad_x = grad_y @ W_deq in x's dtype: W_deq rounded into it (u), the product summed
    # (torch's CPU matmul accumulates fp16/bf16 in fp32: <= N * 2**-24 of the sum of
    # magnitudes), the result rounded (u). Bound (2u + N 2**-24) * sum|terms|, doubled.
    u = UNIT_ROUNDOFF[dtype]
    _assert_within(x.grad, g64 @ W, 2 * (2 * u + N * 2.0**-24) * (g64.abs() @ W.abs()))
    rows = g64.numel() // N
    gb = g64.reshape(-1, N)
    _assert_within(b.grad, gb.sum(0), 2 * (u + rows * 2.0**-24) * gb.abs().sum(0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_empty_batch(dtype):
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(5, 8))
    x = torch.empty(0, 8, dtype=dtype)
    y = ref(LF.int8_linear, x, wq, ws, None, 6.0)
    assert y.shape == (0, 5) and y.dtype == dtype


def test_row_scale_is_one_division():
    """``127 / absmax`` is one IEEE float32 division, not ``reciprocal(absmax) * 127``.

    This pair (found by search on fp16-valued weights) sits where the two roundings part:
    one division gives code -44, the reciprocal route -43.
    """
    W = torch.tensor([[-1.1044921875, 3.224609375]])
    q, scale = ref(LF.int8_quantize_weight, W)
    assert scale.tolist() == [3.224609375]
    assert q.tolist() == [[-44, 127]]
    assert torch.round(W[0, 0] * (127.0 / scale)).item() == -43, "the route we do not take"


def test_row_scale_is_one_division_below_a_tie():
    """The row scale is 127 / absmax rounded once (not reciprocal(absmax) * 127): at this absmax
    the two differ in the last bit, and x = -1.5188005 lands on either side of a rounding tie."""
    absmax = torch.tensor([2.5548036098480225])
    x = torch.tensor([[-1.5188004970550537]])
    one_division = torch.tensor(127.0) / absmax
    assert one_division.item() != (absmax.reciprocal() * 127.0).item()
    q, s = ref(LF.int8_quantize_weight, torch.cat([x, absmax.view(1, 1)], dim=1))
    assert s.item() == absmax.item()
    assert torch.equal(q[:, :1], documented_codes(x, absmax))
    assert q[0, 0].item() == -75  # -75.49999 (one division), not -75.50000 -> -76

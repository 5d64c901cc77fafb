"""LLM.int8 kernels of every backend against the reference: codes bit for bit, the GEMM and
the whole linear within float64-derived bounds, NaN/Inf/zero rows as documented.

The first part runs each native backend of each device (``device_backend``: cpu, cuda, triton);
the second drives the CPU kernels through every instruction-set path (``_C.set_cpu_isa``) and
the GEMM kernel each path picks for small and large M.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SUPPORTED_CPU_ISAS, noncontiguous, run_on

import lowprec_kernels as lpk
from lowprec_kernels import functional as LF
from lowprec_kernels._ops import INT8_INT32_EXACT_MAX_K
from lowprec_kernels.reference.int8 import INT8_SCALE, int8_dequantize_weight
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
U32 = UNIT_ROUNDOFF[torch.float32]
# The largest magnitude below which float16 is subnormal: rounding there is absolute, not
# relative (half its spacing, 2**-25).
FP16_SUBNORMAL_HALF_SPACING = 2.0**-25

# GEMM shapes that reach the edges of the CPU kernels: M = 1..4 take the GEMV-shaped kernel and
# M >= 5 the packed one (register tiles of 6 rows: 7, 17 and 67 end in a partial tile); K not a
# multiple of 4 (vpdpbusd groups), of 64 (vectors) or of 256 (K blocks); N not a multiple of
# 64 (output panels).
GEMM_SHAPES = [
    (1, 70, 23),
    (2, 301, 70),
    (3, 64, 5),
    (4, 257, 129),
    (5, 600, 64),
    (7, 33, 65),
    (17, 530, 70),
    (67, 129, 131),
]


def ref(fn, *args, **kwargs):
    return run_on("reference", fn, *args, **kwargs)


def randn_nonzero(*shape, scale=1.0, dtype=torch.float32, device="cpu"):
    x = torch.randn(*shape) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(device=device, dtype=dtype)


def assert_same_codes(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (actual.cpu() != expected.cpu()).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} codes differ, first at {diff[0].tolist()}"


def assert_same_floats(actual, expected):
    """Equal values, NaN where the expected has NaN (exact: absmax is a max, no arithmetic)."""
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


def assert_quant_matches_reference(backend, x, threshold):
    q, rs, cols = run_on(backend, LF.int8_vectorwise_quant, x, threshold)
    q_ref, rs_ref, cols_ref = ref(LF.int8_vectorwise_quant, x, threshold)
    assert cols.dtype == torch.int64 and cols.dim() == 1
    assert torch.equal(cols.cpu(), cols_ref.cpu())
    assert_same_floats(rs, rs_ref)
    assert_same_codes(q, q_ref)
    return q, rs, cols


# ------------------------------------------------------------------ codes, every backend


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (33, 65), (70, 301), (5, 4096)])
def test_quantize_weight_codes(device_backend, dtype, shape):
    device, backend = device_backend
    W = randn_nonzero(*shape, scale=3.0, dtype=dtype, device=device)
    q, s = run_on(backend, LF.int8_quantize_weight, W)
    q_ref, s_ref = ref(LF.int8_quantize_weight, W)
    assert_same_floats(s, s_ref)
    assert_same_codes(q, q_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_weight_special_rows(device_backend, dtype):
    device, backend = device_backend
    W = randn_nonzero(6, 37, dtype=dtype)
    W[0, 5] = float("nan")  # NaN absmax: codes 0
    W[1, 36] = float("inf")  # inf absmax: codes 0
    W[2] = 0.0  # zero row: scale inf, codes 0
    W[3, :2] = torch.tensor([127.0, 0.5])  # halves round to even
    W[3, 2:] = 1.5
    W[4, 0] = -torch.finfo(dtype).max
    W[5] = torch.finfo(dtype).tiny  # a tiny absmax: scale near the float32 maximum
    W = W.to(device)
    q, s = run_on(backend, LF.int8_quantize_weight, W)
    q_ref, s_ref = ref(LF.int8_quantize_weight, W)
    assert_same_floats(s, s_ref)
    assert_same_codes(q, q_ref)
    assert q[:3].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threshold", [0.0, 6.0, 2.0**-149], ids=["0", "6", "min-float32"])
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3), (2, 1, 67)])
def test_vectorwise_quant_codes(device_backend, dtype, threshold, lead):
    """Planted outliers; the smallest positive float32 threshold makes every nonzero column
    an outlier on every backend."""
    device, backend = device_backend
    K = 203
    x = randn_nonzero(*lead, K, scale=2.0, dtype=dtype)
    X = x.view(-1, K)
    for j, row in ((0, 0), (64, -1), (150, X.shape[0] // 2), (202, 0)):  # planted outliers
        X[row, j] = 8.0 + j / 16
    q, _, cols = assert_quant_matches_reference(backend, x.to(device), threshold)
    assert q.shape == x.shape
    if threshold > 0:
        assert {0, 64, 150, 202} <= set(cols.tolist())
    else:
        assert cols.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vectorwise_quant_nan_inf_zero_rows(device_backend, dtype):
    device, backend = device_backend
    x = randn_nonzero(7, 130, dtype=dtype).clamp(-3, 3)
    x[0, 10] = float("nan")  # NaN is never an outlier: NaN absmax, codes 0
    x[1, 20] = float("inf")  # an outlier when threshold > 0, else an inf absmax
    x[2, 30] = -float("inf")
    x[3] = 0.0  # zero row: absmax 0, codes 0
    x[4, 40] = 7.0  # an ordinary outlier
    x[5, 40] = float("nan")  # NaN inside an outlier column: zeroed, not in the absmax
    for threshold in (0.0, 6.0):
        q, rs, cols = assert_quant_matches_reference(backend, x.to(device), threshold)
        assert q[3].eq(0).all() and rs[3].item() == 0.0
        assert math.isnan(rs[0].item())
        assert math.isnan(rs[5].item()) == (threshold == 0.0)
    x[6] = 6.0 * torch.sign(x[6])  # |x| == threshold everywhere: every column an outlier
    q, rs, cols = assert_quant_matches_reference(backend, x.to(device), 6.0)
    assert cols.tolist() == list(range(130))
    assert q.eq(0).all() and rs.eq(0).all()


def test_vectorwise_quant_exact_ties(device_backend):
    """Products landing exactly on .5 round half to even; -1.5188005 * (127 / 2.5548036) sits
    just below a tie only when 127 / absmax is rounded once."""
    device, backend = device_backend
    halves = torch.arange(-126.5, 127.0, 1.0)  # absmax 127: scale 1, every value a tie
    x = torch.zeros(2, 260)
    x[0, : halves.numel()] = halves
    x[0, -1] = 127.0
    x[1, :2] = torch.tensor([-1.5188004970550537, 2.5548036098480225])
    q, _, _ = assert_quant_matches_reference(backend, x.to(device), 0.0)
    expected = torch.round(halves).to(torch.int8)
    assert torch.equal(q[0, : halves.numel()].cpu(), expected)
    assert q[1, 0].item() == -75


def test_vectorwise_quant_noncontiguous(device_backend):
    device, backend = device_backend
    x = randn_nonzero(9, 70, device=device)
    x[2, 13] = 9.0
    assert_quant_matches_reference(backend, noncontiguous(x), 6.0)


# ------------------------------------------------------------------ GEMM, every backend


def _scaled_mm_float64(A, rs, W, ws, bias):
    A2 = A.reshape(-1, A.shape[-1]).double()
    main = (A2 @ W.double().T) * (rs.double().unsqueeze(1) * ws.double() / INT8_SCALE**2)
    y = main if bias is None else main + bias.double()
    return y, main


def _gemm_bound(y64, main, dtype, outlier_abs=None, num_outliers=0, bias=None):
    """|y - y64| allowed for an output in `dtype` of the int8 GEMM plus epilogue.

    The int32 sums are exact; the float32 epilogue rounds acc to float (exact below 2**24),
    col_stat / 127**2, row_stat * that and the product: at most 4 float32 roundings of the
    dequantized product, 8 u32 leaves room. The outlier term is a sum of `num_outliers`
    products in x's dtype or better (each step one rounding of at most the running sum of
    magnitudes) after W_deq was rounded into it: (num_outliers + 2) u_x of the sum of |terms|,
    doubled. The bias add is one float32 rounding, and the result one rounding into `dtype`
    (absolute below float16's normal range).
    """
    u_out = UNIT_ROUNDOFF[dtype]
    bound = u_out * y64.abs() + 8 * U32 * main.abs()
    if outlier_abs is not None:
        bound = bound + 2 * (num_outliers + 2) * UNIT_ROUNDOFF[dtype] * outlier_abs
        bound = bound + 2 * U32 * outlier_abs
    if bias is not None:
        bound = bound + 2 * U32 * (main.abs() + bias.cpu().double().abs())
    if dtype == torch.float16:
        bound = bound + FP16_SUBNORMAL_HALF_SPACING
    return bound


def _assert_within(y, y64, bound):
    err = (y.cpu().double() - y64.cpu()).abs()
    bad = ~(err <= bound.cpu())
    assert not bad.any(), (
        f"{bad.sum().item()} outputs out of bounds, worst excess "
        f"{(err - bound.cpu())[bad].max().item():.3g}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_scaled_mm_vs_float64(device_backend, dtype, bias, M, K, N):
    device, backend = device_backend
    A = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    A[0, : min(K, 3)] = -128  # any int8 value multiplies exactly
    W = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    rs = torch.rand(M) * 5 + 0.1
    ws = torch.rand(N) * 3 + 0.1
    b = randn_nonzero(N, dtype=dtype) if bias else None
    args = [t.to(device) if t is not None else None for t in (A, rs, W, ws, b)]
    y = run_on(backend, LF.int8_scaled_mm, *args, dtype)
    assert y.dtype == dtype and y.shape == (M, N)
    y64, main = _scaled_mm_float64(A, rs, W, ws, b)
    _assert_within(y, y64, _gemm_bound(y64, main, dtype, bias=b))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scaled_mm_leading_dims_and_empty(device_backend, dtype):
    device, backend = device_backend
    A = torch.randint(-127, 128, (2, 3, 45), dtype=torch.int8, device=device)
    W = torch.randint(-127, 128, (19, 45), dtype=torch.int8, device=device)
    rs = torch.rand(6, device=device) + 0.5
    ws = torch.rand(19, device=device) + 0.5
    y = run_on(backend, LF.int8_scaled_mm, A, rs, W, ws, None, dtype)
    assert y.shape == (2, 3, 19)
    y64, main = _scaled_mm_float64(A.cpu(), rs.cpu(), W.cpu(), ws.cpu(), None)
    _assert_within(y.reshape(6, 19), y64, _gemm_bound(y64, main, dtype))
    empty = A[:0]
    y0 = run_on(backend, LF.int8_scaled_mm, empty, rs[:0], W, ws, None, dtype)
    assert y0.shape == (0, 3, 19) and y0.dtype == dtype


def _linear_float64(x, wq, ws, bias, threshold):
    """The definition of int8_linear in float64, from the reference's (exact) codes."""
    K = x.shape[-1]
    X = x.reshape(-1, K)
    xq, rs, cols = ref(LF.int8_vectorwise_quant, X, threshold)
    y, main = _scaled_mm_float64(xq.cpu(), rs.cpu(), wq.cpu(), ws.cpu(), None)
    outlier_abs = None
    if cols.numel():
        cols = cols.cpu()
        x_out = X.cpu().index_select(1, cols).double()
        w_out = int8_dequantize_weight(wq.cpu().index_select(1, cols), ws.cpu(), torch.float32)
        y = y + x_out @ w_out.double().T
        outlier_abs = x_out.abs() @ w_out.double().abs().T
    if bias is not None:
        y = y + bias.cpu().double()
    return y, main, outlier_abs, cols.numel()


def _planted_activations(M, K, dtype, outlier_cols):
    x = randn_nonzero(M, K).clamp(-3, 3)
    for j in outlier_cols:
        x[:, j] = x[:, j].sign() * (8 + 20 * torch.rand(M))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_int8_linear_vs_float64(device_backend, dtype, threshold, M, K, N):
    device, backend = device_backend
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    outlier_cols = sorted({0, K // 3, K - 1})
    x = _planted_activations(M, K, dtype, outlier_cols)
    b = randn_nonzero(N, dtype=dtype) if M % 2 else None  # both, across the shapes
    y = run_on(backend, LF.int8_linear, x.to(device), wq.to(device), ws.to(device),
               None if b is None else b.to(device), threshold)  # fmt: skip
    assert y.dtype == dtype and y.shape == (M, N)
    y64, main, outlier_abs, n_out = _linear_float64(x, wq, ws, b, threshold)
    if threshold > 0:
        assert n_out == len(outlier_cols)
    bound = _gemm_bound(y64, main, dtype, outlier_abs, n_out, b)
    _assert_within(y, y64, bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int8_linear_leading_dims_noncontiguous_empty(device_backend, dtype):
    device, backend = device_backend
    K, N = 90, 37
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K, device=device))
    x = _planted_activations(6, K, dtype, [11]).to(device)
    b = randn_nonzero(N, dtype=dtype, device=device)
    y = run_on(backend, LF.int8_linear, noncontiguous(x).view(2, 3, K), wq, ws, b, 6.0)
    assert y.shape == (2, 3, N)
    y64, main, outlier_abs, n_out = _linear_float64(x, wq, ws, b, 6.0)
    _assert_within(y.reshape(6, N), y64, _gemm_bound(y64, main, dtype, outlier_abs, n_out, b))
    y0 = run_on(backend, LF.int8_linear, x[:0], wq, ws, b, 6.0)
    assert y0.shape == (0, N) and y0.dtype == dtype


@pytest.mark.parametrize(
    "K",
    [INT8_INT32_EXACT_MAX_K, INT8_INT32_EXACT_MAX_K + 1, 140_000],
    ids=["int32-limit", "past-limit", "wraps-with-127"],
)
def test_rows_whose_int32_sums_would_overflow(device_backend, K):
    """Rows of full codes: K * 128^2 products fit int32 up to INT8_INT32_EXACT_MAX_K
    columns (the kernels' sums); one more runs the reference's float64 sums, never a wrapped
    int32 (which gave -126288.5 for 140,000 columns of +-127 codes). int8_scaled_mm takes
    any int8 codes: -128 times -128 over every column sums to 2^31 one column past the
    limit."""
    device, backend = device_backend
    x = torch.ones(2, K, device=device)
    x[1] = -1.0  # every code +-127, no outliers
    wq, ws = ref(LF.int8_quantize_weight, torch.ones(3, K, device=device))
    want = torch.tensor([[K] * 3, [-K] * 3], dtype=torch.float32)
    y = run_on(backend, LF.int8_linear, x, wq, ws, None, 6.0)
    torch.testing.assert_close(y.cpu(), want, rtol=0, atol=0)
    xq, row_stats, _ = ref(LF.int8_vectorwise_quant, x)
    y = run_on(backend, LF.int8_scaled_mm, xq, row_stats, wq, ws, None, torch.float32)
    torch.testing.assert_close(y.cpu(), want, rtol=0, atol=0)
    lowest = torch.full((1, K), -128, dtype=torch.int8, device=device)
    scale = torch.full((1,), INT8_SCALE, device=device)  # row_stat * col_stat / 127^2 = 1
    y = run_on(backend, LF.int8_scaled_mm, lowest, scale, lowest, scale, None, torch.float32)
    assert y.item() == K * 128**2


def test_int8_linear_nan_inf_zero_rows(device_backend):
    device, backend = device_backend
    K, N = 80, 21
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    x = randn_nonzero(5, K).clamp(-2, 2)
    x[0, 3] = float("nan")  # never an outlier: NaN absmax, NaN output row
    x[1, 7] = float("inf")  # an outlier at threshold 6: reaches its row through the 16-bit term
    x[2] = 0.0  # zero row: the output is the bias alone
    b = randn_nonzero(N)
    args = (wq.to(device), ws.to(device), b.to(device))
    y6 = run_on(backend, LF.int8_linear, x.to(device), *args, 6.0).cpu()
    assert y6[0].isnan().all()
    assert not y6[1].isfinite().any()
    torch.testing.assert_close(y6[2], b, rtol=0, atol=0)
    assert y6[3:].isfinite().all()
    y0 = run_on(backend, LF.int8_linear, x.to(device), *args, 0.0).cpu()
    assert y0[0].isnan().all() and y0[1].isnan().all(), "an infinite absmax: NaN row"
    assert y0[3:].isfinite().all()


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_quantize_then_scaled_mm_of_no_rows(device_backend, lead):
    """A batch with no rows (an MoE expert that got no tokens) through the two-op path, as
    through int8_linear: empty codes, scales and outlier list, then an empty product (the
    quantization refused it)."""
    device, backend = device_backend
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(4, 24, device=device))
    x = torch.empty(*lead, 24, device=device)
    codes, row_stats, cols = run_on(backend, LF.int8_vectorwise_quant, x, 6.0)
    assert codes.shape == x.shape and codes.dtype == torch.int8
    assert row_stats.shape == (0,) and cols.shape == (0,)
    y = run_on(backend, LF.int8_scaled_mm, codes, row_stats, wq, ws, None, torch.float32)
    assert y.shape == (*lead, 4)


def test_scaled_mm_takes_row_stats_shaped_like_the_rows(device_backend):
    """bitsandbytes' int8_vectorwise_quant gives row_stats of A.shape[:-1]: taken as the 1-D
    form is, by every backend (the reference failed to broadcast them, the CPU took them)."""
    device, backend = device_backend
    A = torch.randint(-127, 128, (2, 3, 13), dtype=torch.int8, device=device)
    rs = torch.rand(2, 3, device=device) + 0.1
    W = torch.randint(-127, 128, (5, 13), dtype=torch.int8, device=device)
    ws = torch.rand(5, device=device) + 0.1
    want = ref(LF.int8_scaled_mm, A, rs.reshape(-1), W, ws, None, torch.float32)
    for backend_name in ("reference", backend):
        got = run_on(backend_name, LF.int8_scaled_mm, A, rs, W, ws, None, torch.float32)
        assert got.shape == (2, 3, 5) and torch.equal(got, want), backend_name


def test_epilogue_at_extreme_scales(device_backend):
    """row_stat * col_stat / 127² outside float32's range (over FLT_MAX, or below FLT_MIN):
    every backend takes the reference's float64 product, rounded once. The float32 epilogue
    gave NaN for a zero accumulator (0 * inf) and inf for a finite result, and lost a tenth
    of the value where the scale was subnormal."""
    device, backend = device_backend
    A = torch.tensor([[127, 0], [0, 127]], dtype=torch.int8, device=device)
    W = torch.tensor([[0, 127], [127, 0], [127, 127]], dtype=torch.int8, device=device)
    for row_stats, w_scale in (
        ([1e22, 3.0], [1e21, 1.0, 2.0]),  # row 0: overflowing scales, acc 0 then 127²
        ([1e-40, 2e-39], [3.0, 0.5, 1e-3]),  # subnormal row stats, products below FLT_MIN
    ):
        rs = torch.tensor(row_stats, device=device)
        ws = torch.tensor(w_scale, device=device)
        want = ref(LF.int8_scaled_mm, A, rs, W, ws, None, torch.float32)
        got = run_on(backend, LF.int8_scaled_mm, A, rs, W, ws, None, torch.float32)
        assert torch.equal(got.cpu(), want.cpu()), (row_stats, got, want)
        assert want[0, 0] == 0 if row_stats[0] > 1 else True
    # Through int8_linear: FLT_MAX-scale activations and weights, a finite exact result.
    x = torch.tensor([[3e38, 0.0]], device=device)
    wq, ws = ref(LF.int8_quantize_weight, torch.tensor([[0.0, 3e38], [1.0, 0.0]], device=device))
    want = ref(LF.int8_linear, x, wq, ws, None, 0.0)
    got = run_on(backend, LF.int8_linear, x, wq, ws, None, 0.0)
    assert want.isfinite().all() and torch.equal(got.cpu(), want.cpu())


# ------------------------------------------------------------ CPU: every instruction set

_C = pytest.importorskip("lowprec_kernels._C", reason="native extension not built")


def on_cpu(fn, *args):
    return run_on("cpu", fn, *args)


def test_gemm_kernel_per_isa_and_m(cpu_isa):
    names = {M: _C.int8_gemm_kernel_cpu(M) for M in (1, 4, 5, 512)}
    if cpu_isa == "scalar":
        assert set(names.values()) == {"scalar"}
    elif cpu_isa == "avx2" or names[5] == "avx2-dot":  # AVX-512 without VNNI uses AVX2
        assert set(names.values()) == {"avx2-dot"}
    else:
        assert names == {1: "vnni-dot", 4: "vnni-dot", 5: "vnni-packed", 512: "vnni-packed"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_codes_every_isa(cpu_isa, dtype):
    x = randn_nonzero(19, 133, scale=2.0, dtype=dtype)
    x[0, 5] = float("nan")
    x[1, 6] = float("inf")
    x[2] = 0.0
    x[3, [0, 64, 128, 132]] = 9.0  # outlier columns at vector boundaries and in the tail
    x[4, :4] = torch.tensor([-126.5, 0.5, 1.5, 127.0], dtype=dtype)  # ties
    for threshold in (0.0, 6.0):
        assert_quant_matches_reference("cpu", x, threshold)
    q, s = on_cpu(LF.int8_quantize_weight, x)
    q_ref, s_ref = ref(LF.int8_quantize_weight, x)
    assert_same_floats(s, s_ref)
    assert_same_codes(q, q_ref)


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES + [(800, 40, 30)])
def test_cpu_gemm_every_isa(cpu_isa, M, K, N):
    """The GEMM of each path; M = 800 spans two row blocks of the packed kernel."""
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    W = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    rs = torch.rand(M) * 5 + 0.1
    ws = torch.rand(N) * 3 + 0.1
    b = randn_nonzero(N)
    y = on_cpu(LF.int8_scaled_mm, A, rs, W, ws, b, torch.float32)
    y64, main = _scaled_mm_float64(A, rs, W, ws, b)
    _assert_within(y, y64, _gemm_bound(y64, main, torch.float32, bias=b))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 3, 7, 17])
def test_cpu_linear_every_isa(cpu_isa, dtype, M):
    K, N = 300, 70
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    x = _planted_activations(M, K, dtype, [2, 64, 299])
    b = randn_nonzero(N, dtype=dtype)
    y = on_cpu(LF.int8_linear, x, wq, ws, b, 6.0)
    y64, main, outlier_abs, n_out = _linear_float64(x, wq, ws, b, 6.0)
    _assert_within(y, y64, _gemm_bound(y64, main, dtype, outlier_abs, n_out, b))


def test_cpu_paths_agree_exactly():
    """The paths differ only in the order of exact int32 sums: their outputs are identical."""
    K, N = 333, 77
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    b = randn_nonzero(N)
    previous = _C.get_cpu_isa()
    try:
        for M in (2, 11):
            x = _planted_activations(M, K, torch.float32, [5, 200])
            outs = []
            for isa in SUPPORTED_CPU_ISAS:
                _C.set_cpu_isa(isa)
                outs.append(on_cpu(LF.int8_linear, x, wq, ws, b, 6.0))
            for out in outs[1:]:
                assert torch.equal(out, outs[0])
    finally:
        _C.set_cpu_isa(previous)


def test_cpu_threads_agree():
    M, K, N = 130, 520, 260
    wq, ws = ref(LF.int8_quantize_weight, randn_nonzero(N, K))
    x = _planted_activations(M, K, torch.bfloat16, [1, 400])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = on_cpu(LF.int8_linear, x, wq, ws, None, 6.0)
        q_one = on_cpu(LF.int8_vectorwise_quant, x, 6.0)
        torch.set_num_threads(max(2, previous))
        many = on_cpu(LF.int8_linear, x, wq, ws, None, 6.0)
        q_many = on_cpu(LF.int8_vectorwise_quant, x, 6.0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)
    assert all(torch.equal(a, b) for a, b in zip(q_one, q_many))


def test_cpu_binding_rejects_what_would_corrupt_memory():
    x = torch.randn(4, 10)
    codes = torch.empty(4, 10, dtype=torch.int8)
    rows = torch.empty(4)
    cols = torch.empty(10, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="row_absmax must have"):
        _C.int8_vectorwise_quant_cpu(x, 6.0, codes, torch.empty(3), cols)
    with pytest.raises(RuntimeError, match="out_cols must have"):
        _C.int8_vectorwise_quant_cpu(x, 6.0, codes, rows, cols[:5])
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.int8_quantize_weight_cpu(torch.randn(4, 20)[:, ::2], codes, rows)
    W = torch.zeros(3, 10, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="weight_scale must have"):
        _C.int8_linear_cpu(x, W, torch.ones(2), None, 6.0, torch.empty(4, 3))
    with pytest.raises(RuntimeError, match="out must have"):
        _C.int8_linear_cpu(x, W, torch.ones(3), None, 6.0, torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="bias must have"):
        _C.int8_scaled_mm_cpu(codes, rows, W, torch.ones(3), torch.ones(4), torch.empty(4, 3))


def test_registered_backends():
    from lowprec_kernels._dispatch import kernel_for

    for op in ("int8_quantize_weight", "int8_vectorwise_quant", "int8_scaled_mm", "int8_linear"):
        with lpk.use_backend("cpu"):
            assert kernel_for(op, "cpu")[0] == "cpu"
    if lpk.available_backends()["cuda"]:
        with lpk.use_backend("cuda"):
            assert kernel_for("int8_vectorwise_quant", "cuda")[0] == "cuda"
            # The CUDA GEMM is the triton backend's: forcing cuda falls back to reference.
            assert kernel_for("int8_linear", "cuda")[0] == "reference"

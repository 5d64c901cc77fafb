"""The Triton LLM.int8 kernels, called through the ops with the ``triton`` backend forced,
against the reference (codes, scales and outlier columns exactly) and against float64 (the
GEMM outputs, within a bound derived below).

Without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest.py turns
it on); outputs start as poison (conftest.py). Shapes hit every tail the kernels have:
M = 1, 2, 3, 17 (one 16-row tile and a tail) and the medium/large tile configurations,
K past the 256-wide K step and the 1024-wide row tile, N past one 64/128-wide column tile,
more outlier columns than one 16-column step of the outlier dot, leading batch dims and
non-contiguous inputs.
"""

import pytest
import torch
from conftest import noncontiguous, run_on

triton = pytest.importorskip("triton")

from lowprec_kernels import _dispatch  # noqa: E402
from lowprec_kernels import functional as LF  # noqa: E402
from lowprec_kernels.backends.triton import _utils  # noqa: E402
from lowprec_kernels.backends.triton import int8 as ti  # noqa: E402
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_U = UNIT_ROUNDOFF[torch.float32]
# Half the smallest fp16 subnormal: the absolute error of rounding a tiny value into fp16.
FP16_SUBNORMAL_HALF_STEP = 2.0**-25
LEADS = [(1,), (2,), (3,), (17,), (2, 3)]


@pytest.fixture
def dev(device):
    """A device the Triton kernels run on here (CPU only under the interpreter)."""
    if device == "cpu" and not _utils.interpreter_active():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    return device


def tri(fn, *args, **kwargs):
    return run_on("triton", fn, *args, **kwargs)


def ref(fn, *args, **kwargs):
    return run_on("reference", fn, *args, **kwargs)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Random non-zero values (a zero would hide an unwritten code)."""
    x = torch.randn(*shape) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype).to(device)


def planted(lead, K, dtype, device, cols=(3, 40, 41)):
    """Activations within +-3 except columns ``cols``, whose magnitudes reach 20..60."""
    x = randn(*lead, K).clamp(-3, 3)
    X = x.view(-1, K)
    for j, m in zip(cols, torch.linspace(20, 60, len(cols)).tolist()):
        X[:, j] = X[:, j].sign() * (m * (0.5 + torch.rand(X.shape[0]) / 2)).clamp(min=20)
    return x.to(dtype).to(device)


def assert_identical(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_same_quantization(got, want):
    for g, w in zip(got, want):
        assert_identical(g, w)


# --------------------------------------------------------------------------- registration


def test_kernels_registered(dev):
    for op in ("int8_quantize_weight", "int8_vectorwise_quant", "int8_scaled_mm", "int8_linear"):
        with _dispatch.use_backend("triton"):
            backend, fn = _dispatch.kernel_for(op, dev)
        assert backend == "triton" and fn is getattr(ti, op)


def test_gemm_config_heuristic():
    assert ti.gemm_config(1) is ti.GEMM_SMALL_M and ti.gemm_config(16) is ti.GEMM_SMALL_M
    assert ti.gemm_config(17) is ti.GEMM_MEDIUM_M and ti.gemm_config(64) is ti.GEMM_MEDIUM_M
    assert ti.gemm_config(65) is ti.GEMM_LARGE_M


# --------------------------------------------------------------------------- weight quantization


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (33, 65), (5, 1500), (70, 9)])
def test_quantize_weight_matches_reference(dev, shape, dtype):
    W = randn(*shape, dtype=dtype, device=dev)
    got = tri(LF.int8_quantize_weight, W)
    assert_same_quantization(got, ref(LF.int8_quantize_weight, W))
    assert got[0].abs().amax(1).eq(127).all(), "each row's largest element codes to +-127"


def _scaled(X, absmax):
    """x * (127 / absmax) in fp32 as the reference computes it (one division per row)."""
    absmax = absmax.float().unsqueeze(1)
    return X.float() * (torch.full_like(absmax, 127.0) / absmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_quantize_weight_rounding_ties(dev, dtype):
    # 16-bit weights land on exact .5 ties of x * scale often; each must round half to even
    # exactly as the reference does (one-division scale). Check ties are present.
    W = randn(128, 256, dtype=dtype, device=dev)
    v = _scaled(W, W.float().abs().amax(1))
    assert ((v - v.floor()) == 0.5).sum().item() > 0, "the data must hold ties"
    assert_same_quantization(tri(LF.int8_quantize_weight, W), ref(LF.int8_quantize_weight, W))


def test_quantize_weight_noncontiguous(dev):
    W = randn(37, 29, dtype=torch.float16, device=dev).t()  # a transposed view
    assert not W.is_contiguous()
    got = tri(LF.int8_quantize_weight, W)
    assert got[0].shape == (29, 37) and got[0].is_contiguous()
    assert_same_quantization(got, ref(LF.int8_quantize_weight, W))
    assert_same_quantization(tri(LF.int8_quantize_weight, noncontiguous(W.contiguous())), got)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: 1/0, inf*0 in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_weight_special_rows(dev, dtype):
    W = randn(7, 40, device=dev)
    W[0, 3] = float("nan")  # NaN absmax, codes 0
    W[1, 7] = float("inf")  # inf absmax, codes 0
    W[2] = 0.0  # zero row: absmax 0, codes 0
    W[3] *= 1e-39  # subnormal absmax: 127 / absmax overflows to inf, codes +-127 or 0
    W[4] *= 1e-33
    W[4, 0] = 3e-32  # normal absmax over subnormal elements with non-zero codes
    W[5, 1] = float("-inf")
    W[5, 2] = float("nan")  # NaN beside -inf: NaN
    got = tri(LF.int8_quantize_weight, W.to(dtype))
    assert_same_quantization(got, ref(LF.int8_quantize_weight, W.to(dtype)))
    assert got[1][[0, 5]].isnan().all() and got[1][1].isinf() and got[1][2] == 0
    assert got[0][[0, 1, 2, 5]].eq(0).all()


# --------------------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_vectorwise_matches_reference(dev, lead, dtype, threshold):
    x = planted(lead, 64, dtype, dev)
    got = tri(LF.int8_vectorwise_quant, x, threshold)
    assert_same_quantization(got, ref(LF.int8_vectorwise_quant, x, threshold))
    assert got[2].tolist() == ([3, 40, 41] if threshold else [])


def test_vectorwise_many_rows_and_wide_rows(dev):
    # 70 rows span three outlier-flag tiles (32 rows each) and 1500 columns two row tiles;
    # each outlier sits in a different flag tile, exactly at the threshold or above it.
    x = randn(70, 1500, device=dev).clamp(-3, 3)
    x[0, 1499] = 6.0  # exactly the threshold: an outlier (>=)
    x[35, 2] = -7.5
    x[69, 1024] = 100.0
    x[40, 700] = torch.nextafter(torch.tensor(6.0), torch.tensor(0.0)).item()  # just below
    got = tri(LF.int8_vectorwise_quant, x, 6.0)
    assert got[2].tolist() == [2, 1024, 1499]
    assert_same_quantization(got, ref(LF.int8_vectorwise_quant, x, 6.0))


def test_vectorwise_noncontiguous_and_batched(dev):
    x = planted((4, 5), 48, torch.float16, dev, cols=(0, 47))
    for view in (noncontiguous(x), x.transpose(0, 1)):
        assert not view.is_contiguous()
        got = tri(LF.int8_vectorwise_quant, view, 6.0)
        assert got[0].shape == view.shape
        assert_same_quantization(got, ref(LF.int8_vectorwise_quant, view, 6.0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: 1/0, inf*0 in the interpreter
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_vectorwise_nan_inf_zero_rows(dev, threshold):
    x = randn(6, 30, device=dev).clamp(-2, 2)
    x[0, 4] = float("nan")  # never an outlier: NaN absmax
    x[1, 9] = float("inf")  # an outlier when threshold > 0, else an infinite absmax
    x[2] = 0.0
    x[3, 9] = float("nan")  # in the inf's column: zeroed with it when that is an outlier
    got = tri(LF.int8_vectorwise_quant, x, threshold)
    assert_same_quantization(got, ref(LF.int8_vectorwise_quant, x, threshold))


# --------------------------------------------------------------------------- GEMM


def w_deq64(wq, w_scale):
    """The reference's fp32 dequantized weight, widened exactly to float64."""
    return (wq.float() * (w_scale.float().unsqueeze(1) / 127.0)).double()


def _gemm_parts64(xq, row_stats, wq, w_scale):
    """The int8 part of y in float64 (exact products and sums) and its magnitude."""
    acc = xq.reshape(-1, xq.shape[-1]).double() @ wq.double().T
    s = acc * row_stats.double().unsqueeze(1) * w_scale.double().unsqueeze(0) / 127**2
    return s, s.abs()


def assert_within_bound(
    y, y64, int_abs, outlier_abs, bias, n_outliers, w_unit_roundoff, final_roundings=1
):
    """|y - y64| within what the Triton epilogue's roundings allow:

    * int8 part: the int32 sum is exact, its float64 product with the scales is rounded
      to fp32 once: 2**-24 * |int part| (the bound allows 5 times that);
    * outlier dot: W_deq rounded into x's dtype (``w_unit_roundoff`` * sum|x_o w_o|), the
      fp32 products and sums of n_outliers terms (n_outliers * 2**-24 * sum|x_o w_o|);
    * two fp32 additions (outliers, bias): 2 * 2**-24 * (|int| + |outlier| + |bias|);
    * the final rounding into y's dtype: u * |y| (+ half a subnormal step for fp16), once
      per ``final_roundings``: y64 itself rounded into y's dtype (another backend's output)
      is one more, and two such roundings of fp32 values a few ulps apart can land a whole
      step of y's dtype apart (seen on a GPU, where the reference's fp32 epilogue differs).
    The fp32 terms get a factor 2 of margin (products of (1 + 2**-24) factors).
    """
    y64 = y64.reshape(-1, y64.shape[-1])
    u = UNIT_ROUNDOFF[y.dtype]
    b = bias.double().abs() if bias is not None else torch.zeros(y64.shape[-1], dtype=torch.float64)
    mag = int_abs + outlier_abs + b
    fp32 = 2 * FP32_U * (5 * int_abs + (n_outliers + 2) * mag)
    bound = (1 + u) * (fp32 + w_unit_roundoff * outlier_abs) + final_roundings * u * y64.abs()
    if y.dtype == torch.float16:
        bound = bound + final_roundings * FP16_SUBNORMAL_HALF_STEP
    err = (y.reshape(y64.shape).double() - y64).abs()
    assert bool((err <= bound.to(err.device)).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", LEADS)
def test_scaled_mm_vs_float64(dev, lead, dtype, bias_dtype):
    K, N = 300, 70  # K: one full 256-wide step and a tail; N: a 64-wide tile and a tail
    A = torch.randint(-127, 128, (*lead, K), dtype=torch.int8, device=dev)
    rs = (torch.rand(A.numel() // K) * 5 + 0.1).to(dev)
    W = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
    ws = (torch.rand(N) * 3 + 0.1).to(dev)
    bias = randn(N, dtype=bias_dtype, device=dev) if bias_dtype else None
    y = tri(LF.int8_scaled_mm, A, rs, W, ws, bias, dtype)
    assert y.dtype == dtype and y.shape == (*lead, N)
    s, s_abs = _gemm_parts64(A.cpu(), rs.cpu(), W.cpu(), ws.cpu())
    b = bias.cpu() if bias is not None else None
    y64 = s + (b.double() if b is not None else 0.0)
    assert_within_bound(y.cpu(), y64, s_abs, torch.zeros_like(s), b, 0, 0.0)
    # ... and the reference, within its own roundings of the same float64 value
    y_ref = ref(LF.int8_scaled_mm, A, rs, W, ws, bias, dtype)
    assert_within_bound(y.cpu(), y_ref.cpu().double().reshape(-1, N), 2 * s_abs,
                        torch.zeros_like(s), b, 0, 0.0, final_roundings=2)  # fmt: skip


@pytest.mark.parametrize("M", [80, 130])
def test_scaled_mm_medium_and_large_tiles(dev, M):
    # 80 rows: the 64-row configuration with a tail; 130: two 128-row tiles (and the
    # grouped tile order) over three 128-wide column tiles.
    K, N = 200, 300
    A = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
    W = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
    rs = (torch.rand(M) + 0.5).to(dev)
    ws = (torch.rand(N) + 0.5).to(dev)
    y = tri(LF.int8_scaled_mm, A, rs, W, ws, None, torch.float32)
    s, s_abs = _gemm_parts64(A.cpu(), rs.cpu(), W.cpu(), ws.cpu())
    assert_within_bound(y.cpu(), s, s_abs, torch.zeros_like(s), None, 0, 0.0)


def test_int8_dot_accumulates_exactly(dev):
    # Scales of 127 make y = acc itself; K = 1040 keeps |acc| <= 127 * 127 * 1040 < 2**24,
    # so every sum is an fp32 integer: any inexact accumulation (the interpreter's dot
    # too) shows as a difference. Rows of all +-127 reach that extreme.
    K, N = 1040, 40
    A = torch.randint(-127, 128, (5, K), dtype=torch.int8)
    A[0] = 127
    A[1] = -127
    W = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    W[0] = 127
    A, W = A.to(dev), W.to(dev)
    ones = torch.full((5,), 127.0, device=dev)
    y = tri(LF.int8_scaled_mm, A, ones, W, torch.full((N,), 127.0, device=dev), None, torch.float32)
    exact = (A.cpu().long() @ W.cpu().long().T).float()
    assert exact.abs().max().item() == 127 * 127 * K
    assert torch.equal(y.cpu(), exact)


def test_scaled_mm_noncontiguous(dev):
    A = torch.randint(-127, 128, (3, 6, 40), dtype=torch.int8, device=dev).transpose(0, 1)
    W = torch.randint(-127, 128, (40, 25), dtype=torch.int8, device=dev).t()  # [25, 40] view
    rs = (torch.rand(18) + 0.5).to(dev)
    ws = (torch.rand(25) + 0.5).to(dev)
    y = tri(LF.int8_scaled_mm, A, rs, W, ws, None, torch.float32)
    y_contig = tri(LF.int8_scaled_mm, A.contiguous(), rs, W.contiguous(), ws, None, torch.float32)
    assert y.shape == (6, 3, 25)
    assert_identical(y, y_contig)


def test_scaled_mm_empty_batch(dev):
    y = tri(
        LF.int8_scaled_mm, torch.empty(0, 8, dtype=torch.int8, device=dev),
        torch.empty(0, device=dev), torch.ones(3, 8, dtype=torch.int8, device=dev),
        torch.ones(3, device=dev), None, torch.float16,
    )  # fmt: skip
    assert y.shape == (0, 3) and y.dtype == torch.float16


# --------------------------------------------------------------------------- int8_linear


def _linear_vs_float64(x, wq, ws, bias, threshold, y):
    """Checks y (the Triton int8_linear) against the reference's definition in float64."""
    xq, rs, cols = ref(LF.int8_vectorwise_quant, x, threshold)
    x, wq, ws, xq, rs, cols = (t.cpu() for t in (x, wq, ws, xq, rs, cols))
    s, s_abs = _gemm_parts64(xq, rs, wq, ws)
    X = x.reshape(-1, x.shape[-1]).double().index_select(1, cols)
    Wo = w_deq64(wq, ws).index_select(1, cols)
    o, o_abs = X @ Wo.T, X.abs() @ Wo.abs().T
    b = bias.cpu() if bias is not None else None
    y64 = s + o + (b.double() if b is not None else 0.0)
    w_round = UNIT_ROUNDOFF[x.dtype] if x.dtype != torch.float32 else 0.0
    assert_within_bound(y.cpu(), y64, s_abs, o_abs, b, cols.numel(), w_round)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear_vs_float64(dev, lead, dtype, threshold, bias):
    K, N = 96, 70
    wq, ws = ref(LF.int8_quantize_weight, randn(N, K, device=dev))
    x = planted(lead, K, dtype, dev)
    b = randn(N, dtype=dtype, device=dev) if bias else None
    y = tri(LF.int8_linear, x, wq, ws, b, threshold)
    assert y.dtype == dtype and y.shape == (*lead, N)
    _linear_vs_float64(x, wq, ws, b, threshold, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_many_outliers_large_tiles(dev, dtype):
    # 22 outlier columns: two steps of the 16-column outlier dot, the second partial; 130
    # rows: two 128-row tiles; K = 300: a K tail; an fp32 bias on 16-bit x.
    K, N = 300, 150
    cols = tuple(range(5, 300, 14))
    assert len(cols) == 22
    wq, ws = ref(LF.int8_quantize_weight, randn(N, K, device=dev))
    x = planted((130,), K, dtype, dev, cols=cols)
    b = randn(N, device=dev)
    y = tri(LF.int8_linear, x, wq, ws, b, 6.0)
    assert ref(LF.int8_vectorwise_quant, x, 6.0)[2].tolist() == list(cols)
    _linear_vs_float64(x, wq, ws, b, 6.0, y)


def test_linear_noncontiguous(dev):
    wq, ws = ref(LF.int8_quantize_weight, randn(30, 20, device=dev))
    wq_t = wq.t().contiguous().t()  # the same codes in a column-major layout
    x = planted((3, 4), 20, torch.float16, dev, cols=(4,))
    y = tri(LF.int8_linear, x, wq, ws, None, 6.0)
    assert_identical(tri(LF.int8_linear, noncontiguous(x), wq_t, ws, None, 6.0), y)
    assert_identical(tri(LF.int8_linear, x.transpose(0, 1), wq, ws, None, 6.0), y.transpose(0, 1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: 1/0, inf*0 in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_nan_and_inf_follow_the_reference(dev, dtype):
    wq, ws = ref(LF.int8_quantize_weight, randn(9, 8, device=dev))
    x = randn(5, 8, device=dev).clamp(-2, 2)
    x[1, 2] = float("nan")  # NaN row
    x[3, 4] = float("-inf")  # an outlier: its row gets inf/NaN through the outlier term
    for threshold in (0.0, 6.0):
        y = tri(LF.int8_linear, x.to(dtype), wq, ws, None, threshold)
        y_ref = ref(LF.int8_linear, x.to(dtype), wq, ws, None, threshold)
        assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.isinf(), y_ref.isinf())
        assert torch.equal(y[y.isinf()], y_ref[y_ref.isinf()]), "same signs of infinity"
        finite = y_ref.isfinite()
        torch.testing.assert_close(y[finite], y_ref[finite], rtol=1e-2, atol=1e-2)
        assert y[[0, 2, 4]].isfinite().all()


def test_linear_empty_batch(dev):
    wq, ws = ref(LF.int8_quantize_weight, randn(5, 8, device=dev))
    y = tri(LF.int8_linear, torch.empty(2, 0, 8, device=dev), wq, ws, None, 6.0)
    assert y.shape == (2, 0, 5) and y.dtype == torch.float32


def test_linear_autograd_through_triton(dev):
    wq, ws = ref(LF.int8_quantize_weight, randn(12, 16, device=dev))
    x = planted((3,), 16, torch.float32, dev, cols=(2,)).requires_grad_()
    b = randn(12, device=dev).requires_grad_()
    y = tri(LF.int8_linear, x, wq, ws, b, 6.0)
    gy = randn(3, 12, device=dev)
    y.backward(gy)
    W = w_deq64(wq.cpu(), ws.cpu())
    torch.testing.assert_close(x.grad.cpu().double(), gy.cpu().double() @ W, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, gy.sum(0))


# --------------------------------------------------------------------------- opcheck


def _opcheck_samples(dev):
    wq, ws = ref(LF.int8_quantize_weight, randn(5, 13, device=dev))
    x = planted((2, 3), 13, torch.float16, dev, cols=(4,))
    xq, rs, _ = ref(LF.int8_vectorwise_quant, x, 0.0)
    bias = randn(5, device=dev)
    return {
        "int8_quantize_weight": (randn(7, 13, dtype=torch.bfloat16, device=dev),),
        "int8_vectorwise_quant": (x, 6.0),
        "int8_scaled_mm": (xq, rs, wq, ws, bias, torch.float16),
        "int8_linear": (x.float().requires_grad_(), wq, ws, bias.clone().requires_grad_(), 6.0),
    }


@pytest.mark.parametrize(
    "op", ["int8_quantize_weight", "int8_vectorwise_quant", "int8_scaled_mm", "int8_linear"]
)
def test_opcheck_with_triton_kernels(dev, op):
    # The fake implementations (shapes, dtypes, the unbacked outlier count) and autograd
    # registration hold for the Triton kernels' outputs too.
    args = _opcheck_samples(dev)[op]
    with _dispatch.use_backend("triton"):
        torch.library.opcheck(getattr(torch.ops.lowprec, op).default, args)

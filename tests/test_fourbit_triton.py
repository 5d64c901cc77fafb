"""NF4 / FP4 Triton kernels against the reference: quantize, dequantize, GEMV and GEMM.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest.py
switches it on); with one, on CUDA tensors. Outputs start as poison (conftest.py), so an
element a kernel fails to write fails the comparison. Codes, scales and decoded weights must
equal the reference bit for bit; matmul results are checked against float64 products of the
decoded weight with per-dtype bounds derived below.

The interpreter computes bf16 ``tl.dot`` wrongly, so there the GEMM widens bf16 operands to
fp32 (``_dot_dtype``); the bf16 tensor-core path itself runs only on a GPU
(``benchmarks/gpu_check.sh`` runs this file with ``LOWPREC_TEST_DEVICE=cuda``), under the
same bf16 bound.
"""

import pytest
import torch
from conftest import noncontiguous, run_on

triton = pytest.importorskip("triton")

from lowprec_kernels import _dispatch  # noqa: E402
from lowprec_kernels import functional as LF  # noqa: E402
from lowprec_kernels._ops import BLOCKSIZES_4BIT  # noqa: E402
from lowprec_kernels.backends.triton import _utils  # noqa: E402
from lowprec_kernels.backends.triton import fourbit as tf  # noqa: E402
from lowprec_kernels.reference import fourbit as ref  # noqa: E402
from lowprec_kernels.reference.codebooks import (  # noqa: E402
    FP4_SIGN_BIT,
    code_4bit,
    dynamic_map,
    encode_thresholds,
)
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


@pytest.fixture
def dev(device):
    """A device the Triton kernels run on here (CPU only under the interpreter)."""
    if device == "cpu" and not _utils.interpreter_active():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    return device


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype).to(device)


def _assert_identical(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _check_quantize(x, blocksize, quant_type):
    packed, absmax = tf.quantize_4bit(x, blocksize, quant_type)
    ref_packed, ref_absmax = ref.quantize_4bit(x, blocksize, quant_type)
    _assert_identical(absmax, ref_absmax)
    _assert_identical(packed, ref_packed)
    return packed, absmax


def _sizes(blocksize):
    # n = 1 and 2 (one byte), an odd partial block, full blocks plus an odd tail, and a few
    # thousand elements (several programs: a tile holds 2048 elements).
    return sorted({1, 2, blocksize // 2 + 1, 2 * blocksize + 3, 3001 if blocksize < 2048 else 5003})


# --- registration ---------------------------------------------------------------------------


def test_backend_registered(dev):
    assert _dispatch.available_backends()["triton"]
    for op in ("quantize_4bit", "dequantize_4bit", "matmul_4bit"):
        with _dispatch.use_backend("triton"):
            backend, fn = _dispatch.kernel_for(op, dev)
        assert backend == "triton" and fn is getattr(tf, op)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_encode_tables(quant_type):
    thresholds, code_of_index = tf._encode_tables(quant_type, torch.device("cpu"))
    assert thresholds.shape == code_of_index.shape == (tf.CODEBOOK_SIZE_4BIT,)
    code = code_4bit(quant_type)
    if quant_type == "nf4":
        assert torch.equal(thresholds, encode_thresholds(code))
        assert code_of_index.tolist() == list(range(16))
    else:
        # Sorted magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 are codes 0, 1, 6, 7, 4, 5, 2, 3.
        assert code_of_index[:FP4_SIGN_BIT].tolist() == [0, 1, 6, 7, 4, 5, 2, 3]
        assert torch.isinf(thresholds[FP4_SIGN_BIT - 1 :]).all()
        assert torch.equal(code[code_of_index[:FP4_SIGN_BIT].long()], code[:8].sort().values)


# --- quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_quantize_matches_reference(dev, blocksize, dtype, quant_type):
    for i, n in enumerate(_sizes(blocksize)):
        x = _randn(n, dtype, dev, seed=blocksize + i, scale=3.0)
        packed, _ = _check_quantize(x, blocksize, quant_type)
        if n % 2:
            assert packed.view(-1)[-1].item() & 0xF == 0, "odd count: last low nibble 0"


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_shapes_and_noncontiguous(dev, quant_type):
    x = _randn((37, 29), torch.float16, dev, seed=3).t()  # a transposed view
    assert not x.is_contiguous()
    packed, absmax = _check_quantize(x, 64, quant_type)
    assert packed.shape == ((37 * 29 + 1) // 2, 1) and absmax.shape == (triton.cdiv(37 * 29, 64),)
    _check_quantize(_randn((2, 3, 5, 7), torch.bfloat16, dev, seed=4), 32, quant_type)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_nan_inf_zero_and_subnormal_blocks(dev, quant_type):
    bs = 32
    x = _randn(7 * bs + 5, torch.float32, dev, seed=11)
    x[3] = float("nan")  # block 0: absmax NaN, every code 0 (FP4: 8 for negative x)
    x[bs : 2 * bs] = 0.0  # block 1: all zero
    x[bs + 4] = -0.0  # a negative zero is not negative: no FP4 sign bit
    x[2 * bs + 5] = float("inf")  # block 2: absmax inf; finite x -> 0, inf / inf -> NaN -> 0
    x[3 * bs + 1] = float("-inf")
    x[3 * bs + 2] = float("nan")  # block 3: NaN beside -inf: absmax NaN
    x[4 * bs : 5 * bs] *= 1e-40  # block 4: all subnormal
    x[5 * bs : 6 * bs] *= 1e-39
    x[5 * bs + 1] = 2e-37  # block 5: normal absmax, subnormal elements
    x[-1] = float("nan")  # the partial last block
    packed, absmax = _check_quantize(x, bs, quant_type)
    assert absmax[[0, 3, 7]].isnan().all() and absmax[1] == 0 and absmax[2] == float("inf")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_ties_go_to_the_lower_index(dev, quant_type):
    # absmax = 1 (the block holds 1.0), so v = x exactly. At v = t_i the code is the lower
    # neighbour (t_i is at or below the exact midpoint); one ulp above, the upper one.
    code = code_4bit(quant_type)
    if quant_type == "nf4":
        t = encode_thresholds(code)[:-1]
    else:
        t = encode_thresholds(code[:FP4_SIGN_BIT].sort().values)[:-1]
        t = torch.cat([t, -t])  # FP4 is symmetric: ties in both signs
    above = torch.nextafter(t, torch.where(t < 0, -torch.inf, torch.inf))
    x = torch.cat([t, above, torch.ones(1)]).to(dev)
    _check_quantize(x, 64, quant_type)
    _check_quantize(x.to(torch.float16).to(torch.float32), 64, quant_type)  # more exact ties


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant_through_the_op_matches_reference(dev, quant_type):
    # The whole quantize_4bit (codes + absmax, then the nested blockwise 8-bit of the absmax)
    # on the Triton backend: 282 blocks of 64 -> two nested blocks of 256.
    w = _randn((9, 2000), torch.bfloat16, dev, seed=5, scale=0.1)
    qw, st = run_on("triton", LF.quantize_4bit, w, 64, quant_type, True)
    qw_ref, st_ref = run_on("reference", LF.quantize_4bit, w, 64, quant_type, True)
    assert torch.equal(qw, qw_ref)
    for name in ("absmax", "nested_absmax", "offset", "code", "nested_code"):
        _assert_identical(getattr(st, name), getattr(st_ref, name))


# --- dequantize -----------------------------------------------------------------------------


def _random_state(n, blocksize, quant_type, device, seed, nested_blocksize=None):
    """Random packed codes and scales (single, or double-quantized with ``nested_blocksize``)."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
    nb = triton.cdiv(n, blocksize)
    absmax = torch.rand(nb, generator=g) * 4 + 0.01
    code = code_4bit(quant_type)
    args = [packed, absmax, code, blocksize, None, None, None, 256]
    if nested_blocksize is not None:
        nested_codes = torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g)
        nested_absmax = torch.rand(triton.cdiv(nb, nested_blocksize), generator=g) + 0.1
        offset = torch.rand((), generator=g) + 0.5
        args = [packed, nested_codes, code, blocksize, nested_absmax, dynamic_map(True), offset,
                nested_blocksize]  # fmt: skip
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _dequantize_both(args, shape, dtype):
    packed, absmax, code, bs, *nested = args
    out = tf.dequantize_4bit(packed, absmax, code, bs, shape, dtype, *nested)
    expected = ref.dequantize_4bit(packed, absmax, code, bs, shape, dtype, *nested)
    _assert_identical(out, expected)
    return out


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested_blocksize", [None, 64, 256])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_matches_reference(dev, blocksize, nested_blocksize, dtype, quant_type):
    for i, shape in enumerate([(1,), (7, 301), (3, 5, 2 * blocksize + 3)]):
        n = 1
        for s in shape:
            n *= s
        args = _random_state(n, blocksize, quant_type, dev, seed=blocksize + i, nested_blocksize=nested_blocksize)  # fmt: skip
        _dequantize_both(args, list(shape), dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp16 overflow
def test_dequantize_nan_absmax_and_rounding(dev):
    # A NaN scale makes its block NaN; fp16 overflow and subnormal products round as torch.
    args = _random_state(4 * 64, 64, "nf4", dev, seed=1)
    args[1] = torch.tensor([2.0, float("nan"), 1e5, 1e-6], device=dev)
    for dtype in (torch.float16, torch.bfloat16):
        out = _dequantize_both(args, [4, 64], dtype)
        assert out[1].isnan().all()


# --- matmul -----------------------------------------------------------------------------------


def _w64(qw, st):
    return run_on("reference", LF.dequantize_4bit, qw, st, torch.float32).double()


def _assert_matmul_close(y, x, W64, bias):
    """|y - x @ W.T - bias| within the rounding the kernels may do, elementwise.

    Sources, with S = |x| @ |W|.T + |bias| (the sum of magnitudes):
    * the decoded weight rounded to the dot dtype (x's dtype for fp16 / bf16 on tensor
      cores, none for fp32 and for the GEMV, which decodes to fp32): u(x dtype) * S;
    * fp32 products and sums, over K terms and the bias: (K + 2) * 2**-24 * S;
    * the output rounded once to x's dtype: u(y dtype) * |y|, plus 2**-25 absolute for
      fp16 results below its normal range.
    Doubled for margin (a bound, not an estimate).
    """
    K = x.shape[-1]
    x64 = x.double()
    b64 = bias.double() if bias is not None else torch.zeros((), dtype=torch.float64)
    y64 = x64 @ W64.T + b64.to(x.device)
    scale = x64.abs() @ W64.abs().T + b64.abs().to(x.device)
    u_dot = 0.0 if x.dtype == torch.float32 else UNIT_ROUNDOFF[x.dtype]
    sub = 2.0**-25 if y.dtype == torch.float16 else 0.0
    bound = 2 * ((u_dot + (K + 2) * 2.0**-24) * scale + UNIT_ROUNDOFF[y.dtype] * y64.abs() + sub)
    err = (y.double() - y64).abs()
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert not y.isnan().any(), "unwritten (poisoned) outputs"
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def _quantized(out_f, in_f, blocksize, quant_type, double_quant, device, seed):
    w = _randn((out_f, in_f), torch.float32, device, seed=seed)
    qw, st = run_on("reference", LF.quantize_4bit, w, blocksize, quant_type, double_quant)
    return qw, st, _w64(qw, st)


@pytest.fixture(params=["gemv", "gemm"])
def kernel_path(request, monkeypatch):
    """Forces one matmul kernel for every M (the dispatch rule is tested on its own)."""
    monkeypatch.setattr(tf, "GEMV_MAX_M", 1 << 30 if request.param == "gemv" else 0)
    return request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3), (2, 1, 5)], ids=str)
def test_matmul_matches_float64(dev, kernel_path, lead, dtype, bias):
    out_f, in_f = 37, 101  # odd K: rows start mid-byte; K % 64 != 0: blocks cross rows
    qw, st, W64 = _quantized(out_f, in_f, 64, "nf4", True, dev, seed=len(lead) + lead[0])
    x = _randn((*lead, in_f), dtype, dev, seed=7)
    b = _randn(out_f, dtype, dev, seed=8) if bias else None
    y = run_on("triton", LF.matmul_4bit, x, qw, st, b)
    _assert_matmul_close(y, x, W64, b)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_matmul_quant_settings(dev, kernel_path, blocksize, double_quant, quant_type):
    qw, st, W64 = _quantized(19, 160, blocksize, quant_type, double_quant, dev, seed=blocksize)
    x = _randn((5, 160), torch.float16, dev, seed=9)
    _assert_matmul_close(run_on("triton", LF.matmul_4bit, x, qw, st), x, W64, None)


def test_matmul_other_nested_blocksize(dev, kernel_path):
    # A double-quant state with nested blocks of 64 (bitsandbytes writes 256; the op takes
    # any): the nested scale index b // nested_blocksize must follow it.
    w = _randn((40, 256), torch.float32, dev, seed=2)
    qw, st = run_on("reference", LF.quantize_4bit, w, 32, "nf4", False)
    offset = st.absmax.mean()
    codes, nested_absmax = run_on("reference", LF.quantize_blockwise, st.absmax - offset, None, 64)
    st.absmax, st.nested_absmax, st.offset = codes, nested_absmax, offset
    st.nested_code, st.nested_blocksize = dynamic_map(True, dev), 64
    x = _randn((3, 256), torch.float32, dev, seed=3)
    _assert_matmul_close(run_on("triton", LF.matmul_4bit, x, qw, st), x, _w64(qw, st), None)


def test_matmul_noncontiguous_and_bias_dtype(dev, kernel_path):
    qw, st, W64 = _quantized(24, 64, 64, "fp4", True, dev, seed=4)
    x = noncontiguous(_randn((6, 64), torch.float32, dev, seed=5))
    b = _randn(24, torch.bfloat16, dev, seed=6)  # any float bias dtype: added in fp32
    _assert_matmul_close(run_on("triton", LF.matmul_4bit, x, qw, st, b), x, W64, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gemm_several_tiles_every_direction(dev, dtype):
    # M = 130 > 128 rows: two row tiles; N = 300: three column tiles of 128; K = 200: seven
    # K steps of 32 (fp32) / four of 64 (fp16), the last partial. The grouped launch order
    # must still cover every tile exactly once (poisoned outputs).
    qw, st, W64 = _quantized(300, 200, 64, "nf4", True, dev, seed=10)
    x = _randn((130, 200), dtype, dev, seed=11)
    b = _randn(300, dtype, dev, seed=12)
    _assert_matmul_close(run_on("triton", LF.matmul_4bit, x, qw, st, b), x, W64, b)


def test_gemv_several_tiles(dev):
    # N = 70 with K = 600 (> GEMV_MAX_BLOCK_K: three K steps, the last partial) and several
    # output tiles.
    qw, st, W64 = _quantized(70, 600, 64, "nf4", True, dev, seed=13)
    x = _randn((2, 600), torch.bfloat16, dev, seed=14)
    _assert_matmul_close(run_on("triton", LF.matmul_4bit, x, qw, st), x, W64, None)


def test_dispatch_rule_by_rows(dev, monkeypatch):
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(tf, "_gemv_4bit_kernel", Spy("gemv", tf._gemv_4bit_kernel))
    monkeypatch.setattr(tf, "_gemm_4bit_kernel", Spy("gemm", tf._gemm_4bit_kernel))
    qw, st, _ = _quantized(16, 64, 64, "nf4", True, dev, seed=15)
    for rows in (1, tf.GEMV_MAX_M, tf.GEMV_MAX_M + 1):
        run_on("triton", LF.matmul_4bit, _randn((rows, 64), torch.float16, dev, seed=rows), qw, st)
    assert launched == ["gemv", "gemv", "gemm"]


def test_matmul_empty_batch(dev):
    qw, st, _ = _quantized(5, 64, 64, "nf4", True, dev, seed=16)
    y = run_on("triton", LF.matmul_4bit, torch.empty(0, 64, device=dev), qw, st)
    assert y.shape == (0, 5)


def test_dot_dtype_choice(monkeypatch):
    # fp16: tensor cores in fp16. bf16: bf16 on a GPU; widened (exactly) to fp32 under the
    # interpreter, whose bf16 dot is wrong. fp32: IEEE unless torch allows TF32.
    assert tf._dot_dtype(torch.float16) == (triton.language.float16, "ieee")
    expected_bf16 = (
        triton.language.float32 if _utils.interpreter_active() else triton.language.bfloat16
    )
    assert tf._dot_dtype(torch.bfloat16)[0] == expected_bf16
    assert tf._dot_dtype(torch.float32) == (triton.language.float32, "ieee")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert tf._dot_dtype(torch.float32) == (triton.language.float32, "tf32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(2,), (3, 7)], ids=str)
def test_autograd_through_triton(dev, lead, dtype):
    # The backward decodes W with the Triton dequantize kernel: same gradients as reference.
    qw, st, _ = _quantized(33, 70, 64, "nf4", True, dev, seed=17)
    x0 = _randn((*lead, 70), dtype, dev, seed=18)
    b0 = _randn(33, dtype, dev, seed=19)
    gy = _randn((*lead, 33), dtype, dev, seed=20)
    grads = {}
    for backend in ("reference", "triton"):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        run_on(backend, lambda x=x, b=b: LF.matmul_4bit(x, qw, st, b).backward(gy))
        grads[backend] = (x.grad, b.grad)
    # Same decoded weight (bit-exact dequantize), same torch matmul and sum afterwards.
    _assert_identical(grads["triton"][0], grads["reference"][0])
    _assert_identical(grads["triton"][1], grads["reference"][1])

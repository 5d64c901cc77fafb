"""NF4 / FP4 kernels of every native backend against the reference.

Through the registered ops (``device_backend``: ``cpu``, ``cuda``, ``triton``, whichever run
here): quantize codes and absmax bit for bit, dequantize exactly (fp32) or within one
rounding (fp16/bf16), matmul_4bit within a stated error bound of the float64 product. Then
the CPU extension directly: both matmul paths (GEMV and tiled GEMM) on every CPU ISA path.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import noncontiguous, run_on

import lowprec_kernels as lpk
from lowprec_kernels import functional as LF
from lowprec_kernels._ops import BLOCKSIZES_4BIT
from lowprec_kernels.reference import fourbit as reference
from lowprec_kernels.reference.codebooks import FP4_SIGN_BIT, code_4bit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f16", "bf16")
QUANT_TYPES = ("nf4", "fp4")


def _nonzero_randn(*shape, device, scale=1.0, dtype=torch.float32):
    x = torch.randn(*shape, device=device) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


def _quantize(backend, w, blocksize, quant_type, double_quant=False):
    return run_on(backend, LF.quantize_4bit, w, blocksize, quant_type, double_quant)


def _assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal, except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    bits = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    a = actual[~nan].view(bits)
    e = expected[~nan].view(bits)
    assert torch.equal(a, e), f"{(a != e).sum().item()} of {e.numel()} values differ"


def _assert_same_state(a, b) -> None:
    assert (a.blocksize, a.quant_type, a.shape, a.dtype) == (
        b.blocksize,
        b.quant_type,
        b.shape,
        b.dtype,
    )
    assert a.nested == b.nested
    if b.nested:
        assert torch.equal(a.absmax, b.absmax)  # the uint8 codes of the block absmax
        _assert_same_floats(a.nested_absmax, b.nested_absmax)
        _assert_same_floats(a.offset.reshape(1), b.offset.reshape(1))
    else:
        _assert_same_floats(a.absmax, b.absmax)


# ------------------------------------------------------------------------------ quantize


def _sizes(blocksize: int) -> list[int]:
    return sorted({1, 7, blocksize - 1, blocksize, blocksize + 1, 3 * blocksize + 17})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_quantize_codes_exact(device_backend, blocksize, quant_type, dtype):
    device, backend = device_backend
    for n in _sizes(blocksize):  # odd n: the last byte's low nibble stays 0
        w = _nonzero_randn(n, device=device, scale=3.0, dtype=dtype)
        q_ref, a_ref = run_on(
            "reference", torch.ops.lowprec.quantize_4bit, w, blocksize, quant_type
        )
        q, a = run_on(backend, torch.ops.lowprec.quantize_4bit, w, blocksize, quant_type)
        assert q.shape == ((n + 1) // 2, 1) and q.dtype == torch.uint8
        _assert_same_floats(a, a_ref)
        diff = (q != q_ref).nonzero()
        assert diff.numel() == 0, (
            f"n={n}: {diff.shape[0]} bytes differ, first at {diff[0].tolist()}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_special_blocks(device_backend, quant_type, dtype):
    """NaN, all-zero (with -0.0), inf, subnormal-scale and partial blocks."""
    device, backend = device_backend
    bs = 32
    w = _nonzero_randn(9 * bs + 5, device=device, scale=10.0)
    w[3] = float("nan")  # block 0: absmax NaN, codes 0 (FP4: sign of x kept)
    w[bs : 2 * bs] = 0.0  # block 1: all zero
    w[bs + 7] = -0.0
    w[2 * bs + 9] = float("inf")  # block 2: absmax inf, v = x / inf
    w[3 * bs + 1] = -float("inf")
    w[4 * bs : 5 * bs] = torch.finfo(dtype).tiny / 4  # block 4: subnormal absmax
    w[4 * bs + 3] = -torch.finfo(dtype).tiny / 2
    w[5 * bs + 1] = -torch.finfo(dtype).max  # block 5: the largest magnitude
    w[9 * bs :] = float("nan")  # the partial last block, all NaN
    w = w.to(dtype)
    q_ref, a_ref = run_on("reference", torch.ops.lowprec.quantize_4bit, w, bs, quant_type)
    q, a = run_on(backend, torch.ops.lowprec.quantize_4bit, w, bs, quant_type)
    _assert_same_floats(a, a_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_ties_go_low(device_backend, quant_type):
    """Values exactly at a representable midpoint of two entries (magnitudes for FP4) take the
    lower one; one ulp either side the nearer one."""
    device, backend = device_backend
    code = code_4bit(quant_type).double()
    entries = code if quant_type == "nf4" else code[:FP4_SIGN_BIT].sort().values
    mids = ((entries[:-1] + entries[1:]) / 2).float()
    values = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    if quant_type == "fp4":
        values = torch.cat([values, -values])
    bs = 32
    blocks = values.split(bs - 1)  # each block also holds 1.0, so absmax = 1 and v = x
    w = torch.cat([torch.cat([torch.ones(1), b]) for b in blocks]).to(device)
    q_ref, _ = run_on("reference", torch.ops.lowprec.quantize_4bit, w, bs, quant_type)
    q, _ = run_on(backend, torch.ops.lowprec.quantize_4bit, w, bs, quant_type)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_double_quant_state(device_backend, quant_type):
    device, backend = device_backend
    w = _nonzero_randn(37, 300, device=device)  # blocks cross rows, a partial last block
    qw_ref, st_ref = _quantize("reference", w, 64, quant_type, double_quant=True)
    qw, st = _quantize(backend, w, 64, quant_type, double_quant=True)
    assert torch.equal(qw, qw_ref)
    _assert_same_state(st, st_ref)


def test_quantize_noncontiguous_and_multidim(device_backend):
    device, backend = device_backend
    w = noncontiguous(_nonzero_randn(5, 7, 33, device=device))
    q_ref, a_ref = run_on("reference", torch.ops.lowprec.quantize_4bit, w, 64, "nf4")
    q, a = run_on(backend, torch.ops.lowprec.quantize_4bit, w, 64, "nf4")
    assert torch.equal(q, q_ref) and torch.equal(a, a_ref)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double"])
def test_zero_dim_round_trip(device_backend, double_quant):
    """A 0-dim tensor (one element, shape []) quantizes and decodes back to shape [] (the
    decode refused the empty shape it was given)."""
    device, backend = device_backend
    w = torch.tensor(-0.75, device=device)
    q, st = run_on(backend, LF.quantize_4bit, w, 64, "nf4", double_quant)
    out = run_on(backend, LF.dequantize_4bit, q, st)
    assert out.shape == () and out.item() == pytest.approx(-0.75, rel=0.02)
    assert torch.equal(out, run_on("reference", LF.dequantize_4bit, q, st))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_reaches_as_documented(device_backend, bad):
    """quantize_4bit's docstring: a non-finite weight spoils its block; with double quant
    the absmax mean, so the whole tensor (bitsandbytes' layout: no silent finite garbage)."""
    device, backend = device_backend
    w = _nonzero_randn(64, 256, device=device)
    w[3, 5] = bad
    for double_quant, spoiled in ((False, 64), (True, w.numel())):
        q, st = run_on(backend, LF.quantize_4bit, w, 64, "nf4", double_quant)
        out = run_on(backend, LF.dequantize_4bit, q, st)
        assert (~out.isfinite()).sum().item() == spoiled


# ---------------------------------------------------------------------------- dequantize


def _random_packed(n: int, device) -> torch.Tensor:
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    if n % 2:  # the reference's packing leaves the unused low nibble 0
        packed[-1] &= 0xF0
    return packed


def _assert_within_one_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` is ``ref`` or one of its neighbours in out's dtype.

    The reference forms each value in fp32 (codebook entry times block scale) and rounds it
    once into the 16-bit dtype. A kernel may form the product differently (in fp32 then a
    different rounding step, or from a scale already in the compute dtype); the definition
    we hold every backend to is that the result is within one unit in the last place of the
    16-bit value: at most one rounding away from the reference.
    """
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    o, r = out[~nan], ref[~nan]
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.full_like(r, -float("inf")))
    ok = (o == r) | (o == up) | (o == down)
    assert bool(ok.all()), f"{(~ok).sum().item()} values more than one rounding off"


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_dequantize(device_backend, blocksize, dtype, double_quant):
    device, backend = device_backend
    for n in _sizes(blocksize):
        w = _nonzero_randn(n, device=device, scale=5.0)
        _, st = _quantize("reference", w, blocksize, "nf4", double_quant)
        qw = _random_packed(n, device)  # every code, not only those random data hits
        ref = run_on("reference", LF.dequantize_4bit, qw, st, dtype)
        out = run_on(backend, LF.dequantize_4bit, qw, st, dtype)
        assert out.dtype == dtype and out.shape == ref.shape
        if dtype == torch.float32 or backend == "cpu":
            _assert_same_floats(out, ref)  # fp32: exact; the CPU kernels round exactly as torch
        else:
            _assert_within_one_rounding(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequantize_special_scales_and_shape(device_backend, dtype):
    """NaN, zero, inf, huge and subnormal absmax; fp4; a 3-D shape with an odd count."""
    device, backend = device_backend
    shape = (3, 5, 43)
    n = 3 * 5 * 43
    w = _nonzero_randn(*shape, device=device)
    _, st = _quantize("reference", w, 32, "fp4")
    scales = torch.tensor([float("nan"), 0.0, float("inf"), 3e38, 1e-40, 7e4, 1.0 + 2**-9])
    st.absmax = scales.repeat(-(-st.absmax.numel() // scales.numel()))[: st.absmax.numel()]
    st.absmax = st.absmax.to(device)
    qw = _random_packed(n, device)
    ref = run_on("reference", LF.dequantize_4bit, qw, st, dtype)
    out = run_on(backend, LF.dequantize_4bit, qw, st, dtype)
    assert out.shape == shape
    if dtype == torch.float32 or backend == "cpu":
        _assert_same_floats(out, ref)
    else:
        _assert_within_one_rounding(out, ref)


# -------------------------------------------------------------------------------- matmul


def _float64_product(x, qw, st, bias):
    """(y64, scale) of reference.fourbit.matmul_4bit_float64 for the reference's decoded W."""
    W = run_on("reference", LF.dequantize_4bit, qw, st, torch.float32).double()
    return reference.matmul_4bit_float64(x, W, bias)


def _assert_matmul_close(y, y64, scale, dtype, in_features):
    """Within the error every backend's matmul_4bit must stay within (its derivation:
    reference.fourbit.matmul_4bit_error_excess)."""
    excess = reference.matmul_4bit_error_excess(y, y64, scale, dtype, in_features)
    assert bool((excess <= 0).all()), f"max excess {excess.max().item():.3g}"


ROWS = (1, 2, 3, 4, 8, 9, 17, 65)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", ROWS)
def test_matmul_rows(device_backend, rows, dtype, double_quant, bias):
    device, backend = device_backend
    out_f, in_f = 37, 200  # 200 % 64 != 0: blocks cross rows
    w = _nonzero_randn(out_f, in_f, device=device)
    qw, st = _quantize("reference", w, 64, "nf4", double_quant)
    x = _nonzero_randn(rows, in_f, device=device, dtype=dtype)
    b = _nonzero_randn(out_f, device=device, dtype=dtype) if bias else None
    y = run_on(backend, LF.matmul_4bit, x, qw, st, b)
    assert y.dtype == dtype and y.shape == (rows, out_f)
    _assert_matmul_close(y, *_float64_product(x, qw, st, b), dtype, in_f)


@pytest.fixture
def full_precision_gemm_reductions():
    """cuBLAS reductions in float32 (torch's defaults allow fp16 / bf16 ones), which is what
    the error bound assumes; a backend's GEMM path follows these settings as F.linear does."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_fp16_reduced_precision_reduction,
             matmul.allow_bf16_reduced_precision_reduction)  # fmt: skip
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    yield
    (matmul.allow_fp16_reduced_precision_reduction,
     matmul.allow_bf16_reduced_precision_reduction) = saved  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matmul_batch_long_rows(device_backend, dtype, full_precision_gemm_reductions):
    """A batch beyond the GEMV (16 rows) with long rows (K = 4096): the GEMM paths, where
    split-K reductions would show, stay within the float32-accumulation bound."""
    device, backend = device_backend
    out_f, in_f = 48, 4096
    w = _nonzero_randn(out_f, in_f, device=device)
    qw, st = _quantize("reference", w, 64, "nf4", True)
    x = _nonzero_randn(16, in_f, device=device, dtype=dtype)
    y = run_on(backend, LF.matmul_4bit, x, qw, st, None)
    _assert_matmul_close(y, *_float64_product(x, qw, st, None), dtype, in_f)


def test_matmul_under_torchs_newer_precision_api(device_backend):
    """TF32 allowed through torch.backends.cuda.matmul.fp32_precision, the API under which
    torch.get_float32_matmul_precision raises: the GEMM path still runs (it raised)."""
    device, backend = device_backend
    w = _nonzero_randn(48, 256, device=device)
    qw, st = _quantize("reference", w, 64, "nf4", True)
    x = _nonzero_randn(16, 256, device=device)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        y = run_on(backend, LF.matmul_4bit, x, qw, st, None)
    finally:
        matmul.fp32_precision = saved
    y64, _ = _float64_product(x, qw, st, None)
    torch.testing.assert_close(y.double().cpu(), y64.cpu(), rtol=1e-2, atol=1e-2)  # TF32 or not


@pytest.mark.parametrize("in_f", [1, 31, 33, 95, 129])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_matmul_odd_in_features(device_backend, in_f, quant_type):
    """Odd K: every other weight row starts in the middle of a byte."""
    device, backend = device_backend
    out_f = 23
    w = _nonzero_randn(out_f, in_f, device=device)
    qw, st = _quantize("reference", w, 32, quant_type, double_quant=True)
    b = _nonzero_randn(out_f, device=device)
    for rows in (1, 3, 17):
        x = _nonzero_randn(rows, in_f, device=device)
        y = run_on(backend, LF.matmul_4bit, x, qw, st, b)
        _assert_matmul_close(y, *_float64_product(x, qw, st, b), torch.float32, in_f)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(0,), (2, 3), (2, 1, 5), (1, 1, 1)])
def test_matmul_leading_dims_and_noncontiguous(device_backend, dtype, lead):
    device, backend = device_backend
    out_f, in_f = 40, 96
    w = _nonzero_randn(out_f, in_f, device=device)
    qw, st = _quantize("reference", w, 32, "fp4", double_quant=True)
    x = noncontiguous(_nonzero_randn(*lead, in_f, device=device, dtype=dtype))
    y = run_on(backend, LF.matmul_4bit, x, qw, st)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    if y.numel():
        _assert_matmul_close(y, *_float64_product(x, qw, st, None), dtype, in_f)


def test_matmul_bias_of_another_dtype(device_backend):
    device, backend = device_backend
    w = _nonzero_randn(16, 64, device=device)
    qw, st = _quantize("reference", w, 64, "nf4", double_quant=True)
    x = _nonzero_randn(3, 64, device=device, dtype=torch.bfloat16)
    b = _nonzero_randn(16, device=device, dtype=torch.float32)
    y = run_on(backend, LF.matmul_4bit, x, qw, st, b)
    assert y.dtype == torch.bfloat16
    _assert_matmul_close(y, *_float64_product(x, qw, st, b), torch.bfloat16, 64)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_matmul_blocksizes(device_backend, blocksize):
    device, backend = device_backend
    out_f, in_f = 9, 1000
    w = _nonzero_randn(out_f, in_f, device=device)
    qw, st = _quantize("reference", w, blocksize, "nf4", double_quant=True)
    for rows in (1, 12):
        x = _nonzero_randn(rows, in_f, device=device)
        y = run_on(backend, LF.matmul_4bit, x, qw, st)
        _assert_matmul_close(y, *_float64_product(x, qw, st, None), torch.float32, in_f)


# ------------------------------------------------------------------- the CPU extension


_C = lpk._C  # None when the extension is not built

needs_cpu_extension = pytest.mark.skipif(
    _C is None or not hasattr(_C, "matmul_4bit_gemv_cpu"), reason="CPU extension not built"
)


def _weight_args(qw, st):
    return (qw, st.absmax, st.code, st.blocksize, st.nested_absmax, st.nested_code, st.offset,
            st.nested_blocksize)  # fmt: skip


@needs_cpu_extension
def test_cpp_4bit_constants_match_python():
    constants = _C.build_info()["constants"]
    assert constants["blocksize_min_4bit"] == min(BLOCKSIZES_4BIT)
    assert constants["blocksize_max_4bit"] == max(BLOCKSIZES_4BIT)
    assert constants["fp4_sign_bit"] == FP4_SIGN_BIT
    if _C.build_info()["cuda_compiled"]:
        from lowprec_kernels.backends import cuda as cuda_backend

        assert constants["cuda_gemv_4bit_max_rows"] == cuda_backend.GEMV_MAX_ROWS


@needs_cpu_extension
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_quantize_dequantize_every_isa(cpu_isa, dtype, quant_type):
    for blocksize in (32, 64, 4096):
        for n in (1, 33, 3 * blocksize + 17):
            w = _nonzero_randn(n, device="cpu", scale=3.0, dtype=dtype)
            w[min(5, n - 1)] = -0.0
            q_ref, a_ref = reference.quantize_4bit(w, blocksize, quant_type)
            q = torch.full_like(q_ref, 0xAB)
            a = torch.full_like(a_ref, -1.0)
            _C.quantize_4bit_cpu(w, code_4bit(quant_type), blocksize, quant_type, q, a)
            assert torch.equal(q, q_ref) and torch.equal(a, a_ref)
            _, st = LF.quantize_4bit(w.float(), blocksize, quant_type, double_quant=True)
            absmax, code, bs, shape, *nested = st.op_args()
            for out_dtype in DTYPES:
                ref = reference.dequantize_4bit(q, absmax, code, bs, shape, out_dtype, *nested)
                out = torch.full((n,), float("nan"), dtype=out_dtype)
                _C.dequantize_4bit_cpu(*_weight_args(q, st), out)
                _assert_same_floats(out, ref)


@needs_cpu_extension
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_matmul_paths_every_isa(cpu_isa, path, dtype):
    """Both matmul paths on every ISA, at shapes that hit each tail: odd K (rows starting
    mid-byte), K % blocksize != 0, partial vectors, every group size of x rows. K a multiple
    of 128 takes the AVX-512 GEMV's lane-strided kernel for fp32/fp16 x at every M (chunks
    spanning 4, 2 or 1 blocks, blocks spanning rows; a last group of 1, 2 or 3 rows at 9, 6
    and 7 rows), other K its split kernels. 29 x 640 at blocksize 32: a row's
    16-block scale vector straddles a nested (double-quant) block at row 25. 3 x 8192: rows
    of the lane kernel in several K-slices (tiles) at every M; 5 x 1024 at blocksize 256 and
    FP4: a chunk within one block, the other codebook. At M <= 4 (bf16 x: M <= 2) rows take the
    streaming driver, which sums 16 rows at a time (29 rows: a panel cut short by the end;
    45 x 4096: also by the split between two threads): the lane kernel's, and for bf16 x (K a
    multiple of 64, blocks of 64 or more) the vdpbf16ps kernel's, 4160 giving it an odd chunk
    count. 6 x 640 at blocksize 256: rows starting inside a block. Longer rows run in slices
    of x: 5 x 8320 (two for fp32 and fp16 x, one for bf16; rows across two nested blocks),
    3 x 16512 (three slices; two for bf16 x), at blocksize 32 with rows across three nested
    blocks, whose scales are decoded."""
    kernel = getattr(_C, f"matmul_4bit_{path}_cpu")
    shapes = ((37, 200, 64), (11, 95, 32), (5, 1, 32), (3, 4096 + 64, 128),
              (29, 640, 32), (7, 256, 64), (5, 640, 128), (4, 512, 4096), (3, 8192, 64),
              (5, 1024, 256), (45, 4096, 64), (6, 640, 256), (5, 8320, 64),
              (3, 16512, 64), (3, 16512, 32))  # fmt: skip
    for (out_f, in_f, blocksize), (quant_type, double_quant) in itertools.product(
        shapes, (("nf4", False), ("nf4", True), ("fp4", True))
    ):
        w = _nonzero_randn(out_f, in_f, device="cpu")
        qw, st = LF.quantize_4bit(w, blocksize, quant_type, double_quant)
        for rows in (1, 2, 3, 4, 6, 7, 9):
            x = _nonzero_randn(rows, in_f, device="cpu", dtype=dtype)
            b = _nonzero_randn(out_f, device="cpu")
            out = torch.full((rows, out_f), float("nan"), dtype=dtype)
            kernel(x, *_weight_args(qw, st), b, out)
            _assert_matmul_close(out, *_float64_product(x, qw, st, b), dtype, in_f)


@needs_cpu_extension
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double"])
def test_cpu_gemm_bf16_tiles(cpu_isa, double_quant):
    """bf16 GEMM shapes that take the brgemm path where oneDNN's microkernel runs (in_features
    a multiple of 32 and of the blocksize): partial 16-row groups and 64-row tiles, blocks of
    32 and 256, more than 128 rows of x (several microkernel calls per tile)."""
    for out_f, in_f, blocksize in ((70, 256, 64), (33, 96, 32), (17, 512, 256)):
        w = _nonzero_randn(out_f, in_f, device="cpu")
        qw, st = LF.quantize_4bit(w, blocksize, "nf4", double_quant)
        for rows in (9, 130):
            x = _nonzero_randn(rows, in_f, device="cpu", dtype=torch.bfloat16)
            b = _nonzero_randn(out_f, device="cpu")
            out = torch.full((rows, out_f), float("nan"), dtype=torch.bfloat16)
            _C.matmul_4bit_gemm_cpu(x, *_weight_args(qw, st), b, out)
            _assert_matmul_close(out, *_float64_product(x, qw, st, b), torch.bfloat16, in_f)


@needs_cpu_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags
def test_cpu_gemm_fp32_tiles(cpu_isa, dtype):
    """GEMM shapes of the fp32 brgemm path (the AVX-512 path up to 128 rows of x, in_features
    even, any x dtype computed in fp32): rows of x padded to a multiple of 16 (13, 17, 100),
    more than 64 (two microkernel calls per slice), a last tile of weight rows cut short (70,
    33), in_features in several slices with a short last one (2112, 4100), with and without
    bias, and with mkldnn disabled; odd in_features (95) and 129 rows take torch's GEMM per
    tile."""
    shapes = ((70, 2112, 64, True), (33, 4100, 64, True), (33, 95, 32, False))
    for out_f, in_f, blocksize, double_quant in shapes:
        w = _nonzero_randn(out_f, in_f, device="cpu")
        qw, st = LF.quantize_4bit(w, blocksize, "nf4", double_quant)
        for rows in (13, 17, 100, 128, 129):
            x = _nonzero_randn(rows, in_f, device="cpu", dtype=dtype)
            brgemm = (
                _C.cpu_fp32_brgemm_available()
                and in_f % 2 == 0
                and rows <= 128
                and not (dtype == torch.bfloat16 and _C.cpu_bf16_gemm_native())
            )
            kernel = _C.matmul_4bit_gemm_kernel_cpu(x, blocksize)
            assert (kernel == "brgemm_f32") == brgemm, kernel
            for b in (None, _nonzero_randn(out_f, device="cpu")):
                for mkldnn in (True, False):  # off: torch's GEMM per tile
                    out = torch.full((rows, out_f), float("nan"), dtype=dtype)
                    with torch.backends.mkldnn.flags(enabled=mkldnn):
                        _C.matmul_4bit_gemm_cpu(x, *_weight_args(qw, st), b, out)
                    _assert_matmul_close(out, *_float64_product(x, qw, st, b), dtype, in_f)


@needs_cpu_extension
@pytest.mark.parametrize("rows", [16, 200], ids=["brgemm-rows", "torch-gemm-rows"])
def test_cpu_gemm_trainable_bias_leaves_out_plain(rows):
    """A direct kernel call in grad mode with a bias that requires grad computes a value: out
    gets no autograd history (the fp32 brgemm path recorded the bias add)."""
    qw, st = LF.quantize_4bit(_nonzero_randn(64, 128, device="cpu"), 64, "nf4", True)
    bias = _nonzero_randn(64, device="cpu").requires_grad_()
    out = torch.full((rows, 64), float("nan"))
    x = _nonzero_randn(rows, 128, device="cpu")
    _C.matmul_4bit_gemm_cpu(x, *_weight_args(qw, st), bias, out)
    assert not out.requires_grad
    _assert_matmul_close(out, *_float64_product(x, qw, st, bias.detach()), torch.float32, 128)


@needs_cpu_extension
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_cpu_matmul_no_in_features(path):
    """in_features 0 (the op refuses such a weight; a direct kernel call may not): empty sums,
    so out is the bias, or zeros."""
    kernel = getattr(_C, f"matmul_4bit_{path}_cpu")
    qw, st = LF.quantize_4bit(_nonzero_randn(8, 64, device="cpu"), 64, "nf4", False)
    absmax, code, blocksize, _, *nested = st.op_args()
    x = torch.empty(13, 0)
    b = _nonzero_randn(5, device="cpu")
    for bias, want in ((b, b.expand(13, 5)), (None, torch.zeros(13, 5))):
        out = torch.full((13, 5), float("nan"))
        kernel(x, qw[:0], absmax[:0], code, blocksize, *nested, bias, out)
        assert torch.equal(out, want)


@needs_cpu_extension
def test_cpu_gemm_bf16_computes_in_fp32_without_avx512_bf16(cpu_isa):
    """On x86 without AVX512_BF16 (torch's bf16 GEMM has no dot product there) bf16 x
    computes in fp32, exactly as x.float() does, then rounds once; elsewhere bf16 (brgemm
    where its shapes allow, 256 here, else torch's bf16 GEMM, 200) stays within bf16's
    error."""
    for in_f in (256, 200):
        w = _nonzero_randn(70, in_f, device="cpu")
        qw, st = LF.quantize_4bit(w, 64, "nf4", True)
        x = _nonzero_randn(9, in_f, device="cpu", dtype=torch.bfloat16)
        b = _nonzero_randn(70, device="cpu")
        out = torch.full((9, 70), float("nan"), dtype=torch.bfloat16)
        _C.matmul_4bit_gemm_cpu(x, *_weight_args(qw, st), b, out)
        if _C.cpu_bf16_gemm_native():
            _assert_matmul_close(out, *_float64_product(x, qw, st, b), torch.bfloat16, in_f)
        else:
            out_fp32 = torch.full((9, 70), float("nan"))
            _C.matmul_4bit_gemm_cpu(x.float(), *_weight_args(qw, st), b, out_fp32)
            assert torch.equal(out, out_fp32.bfloat16())


@needs_cpu_extension
@pytest.mark.parametrize("brgemm", [True, False], ids=["brgemm", "no-brgemm"])
@pytest.mark.parametrize("has_bf16", [False, True], ids=["no-bf16", "bf16"])
def test_cpu_gemv_max_rows_follow_the_path_in_force(cpu_isa, has_bf16, brgemm, monkeypatch):
    """The crossover follows the path in force (set_cpu_isa) and, on AVX-512, the CPU's BF16
    (without it bf16 computes in fp32 and takes fp32's crossover) and whether the fp32 brgemm
    kernel runs (torch with oneDNN, mkldnn enabled)."""
    from lowprec_kernels.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "_CPU_HAS_AVX512_BF16", has_bf16)
    monkeypatch.setattr(cpu_backend._C, "cpu_fp32_brgemm_available", lambda: brgemm)
    want = {  # fp32, bf16, fp16
        ("avx512", True): (512, 5, 512),
        ("avx512", False): (12, 12, 12) if brgemm else (32, 32, 32),
        ("avx2", True): (16, 16, 16),
        ("avx2", False): (16, 16, 16),
        ("scalar", True): (16, 6, 16),
        ("scalar", False): (16, 6, 16),
    }[(cpu_isa, has_bf16)]
    got = tuple(
        cpu_backend.gemv_max_rows(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)
    )
    assert got == want
    assert cpu_backend.gemv_max_rows(torch.int8) == 0


@needs_cpu_extension
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags
def test_cpu_fp32_brgemm_available_follows_mkldnn(cpu_isa):
    """The fp32 brgemm kernel runs on the AVX-512 path of a torch with oneDNN, and not while
    mkldnn is disabled (torch.backends.mkldnn.flags)."""
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _C.cpu_fp32_brgemm_available()
    want = cpu_isa == "avx512" and torch.backends.mkldnn.is_available()
    assert _C.cpu_fp32_brgemm_available() == want


@needs_cpu_extension
@pytest.mark.parametrize(("out_f", "in_f"), [(300, 256), (40, 8320)])
def test_cpu_gemv_is_deterministic_across_threads(out_f, in_f):
    """300 x 256 split between threads mid-panel; 40 x 8320: rows in slices of x."""
    w = _nonzero_randn(out_f, in_f, device="cpu")
    qw, st = LF.quantize_4bit(w, 64, "nf4", True)
    previous = torch.get_num_threads()
    for rows in (1, 3, 6):  # the streaming driver (1, 3) and the tiled one (6)
        x = _nonzero_randn(rows, in_f, device="cpu")
        outs = []
        try:
            for threads in (1, max(2, previous)):
                torch.set_num_threads(threads)
                out = torch.empty(rows, out_f)
                _C.matmul_4bit_gemv_cpu(x, *_weight_args(qw, st), None, out)
                outs.append(out)
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(outs[0], outs[1])


@needs_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("out_f", "in_f", "blocksize"),
    [
        (9, 4096 + 96, 64),
        (7, 2048 + 33, 32),
        (19, 4096, 64),
        (5, 4160, 128),
        (6, 640, 256),
        (4, 8320, 64),
        (3, 16512, 32),
    ],
)
def test_cpu_gemv_decodes_every_scale_exactly(cpu_isa, out_f, in_f, blocksize, dtype):
    """x = unit vectors (1, 2 and 4 rows of x) pick columns of W: y is their decoded weights
    bit for bit (bf16 x: rounded to bf16, as the bf16 kernel's tables are). A column in every
    64 of every row,
    double-quantized scales whose nested absmax differs per nested block: rows of 64 or more
    blocks take the AVX-512 byte-plane scale decode (with AVX512_VBMI), rows starting mid-block
    and mid nested block, the last blocks of a row in the 16-wide decode and its scalar tail;
    19 x 4096, 5 x 4160 (bf16), 6 x 640 and 4 x 8320 in the streaming driver, 4160 and 640
    with rows starting inside a block, 8320 in two slices of x (fp32) with rows across two
    nested blocks, 16512 at blocksize 32 in slices with rows across three nested blocks
    (decoded scales)."""
    w = _nonzero_randn(out_f, in_f, device="cpu")
    qw, st = LF.quantize_4bit(w, blocksize, "nf4", True)
    st.nested_absmax = torch.linspace(0.5, 2.0, st.nested_absmax.numel())
    W = run_on("reference", LF.dequantize_4bit, qw, st, torch.float32).to(dtype)
    for rows in (1, 2, 4):
        # Row r of x picks column k + r * spread: each row of x a column in every 64.
        spread = 64 // rows
        out = torch.empty(rows, out_f, dtype=dtype)
        for k in range(blocksize // 3 % 64, in_f - (rows - 1) * spread, 64):
            x = torch.zeros(rows, in_f, dtype=dtype)
            columns = [k + r * spread for r in range(rows)]
            for r, c in enumerate(columns):
                x[r, c] = 1.0
            _C.matmul_4bit_gemv_cpu(x, *_weight_args(qw, st), None, out)
            for r, c in enumerate(columns):
                assert torch.equal(out[r], W[:, c]), f"x row {r}, column {c}"


@needs_cpu_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_gemv_of_no_in_features_is_the_bias(cpu_isa, dtype):
    """in_features 0 at every row count: y = bias (the streaming driver, which divides by the
    row's length, is not taken)."""
    qw, absmax = torch.empty(0, 1, dtype=torch.uint8), torch.empty(0)
    b = _nonzero_randn(3, device="cpu")
    for rows in (1, 2, 3, 4, 6):
        x = torch.empty(rows, 0, dtype=dtype)
        out = torch.full((rows, 3), float("nan"), dtype=dtype)
        _C.matmul_4bit_gemv_cpu(x, qw, absmax, code_4bit("nf4"), 64, None, None, None, 256, b, out)
        assert torch.equal(out, b.to(dtype).expand(rows, 3))


@needs_cpu_extension
def test_cpu_bindings_reject_what_would_corrupt_memory():
    w = torch.randn(10, 64)
    qw, st = LF.quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        _C.matmul_4bit_gemv_cpu(x, *_weight_args(qw, st), None, torch.empty(2, 10).double())
    with pytest.raises(RuntimeError, match="packed must have"):
        _C.matmul_4bit_gemv_cpu(x, *_weight_args(qw[:-1], st), None, torch.empty(2, 10))
    with pytest.raises(RuntimeError, match="nested_absmax, nested_code and offset"):
        _C.dequantize_4bit_cpu(qw, st.absmax, st.code, 64, None, None, None, 256, torch.empty(640))
    with pytest.raises(RuntimeError, match="nested_blocksize must be a power of two in"):
        # 32 is a power of two, but no nested blocksize of the format (as the Python checker)
        _C.dequantize_4bit_cpu(*_weight_args(qw, st)[:-1], 32, torch.empty(640))
    with pytest.raises(RuntimeError, match="blocksize"):
        _C.quantize_4bit_cpu(w, st.code, 48, "nf4", qw, torch.empty(10))
    with pytest.raises(RuntimeError, match="quant_type"):
        _C.quantize_4bit_cpu(w, st.code, 64, "nf5", qw, torch.empty(10))

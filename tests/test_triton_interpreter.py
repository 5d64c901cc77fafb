"""The Triton backend's own tests: its kernels called directly, against the reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest.py
switches it on before triton is imported); with one, on CUDA tensors. Outputs start as
poison (conftest.py). The cross-backend comparisons through the ops are test_blockwise.py;
this file adds the cases where a Triton kernel could go wrong on its own: tile tails,
NaN/inf/zero/subnormal blocks, exact threshold ties, bf16 rounding, the threshold cache.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from lowprec_kernels import _dispatch  # noqa: E402
from lowprec_kernels._ops import BLOCKSIZES_8BIT  # noqa: E402
from lowprec_kernels.backends.triton import _utils  # noqa: E402
from lowprec_kernels.backends.triton import blockwise as tb  # noqa: E402
from lowprec_kernels.reference import blockwise as ref  # noqa: E402
from lowprec_kernels.reference.codebooks import dynamic_map, encode_thresholds  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def dev(device):
    """A device the Triton kernels run on here (CPU only under the interpreter)."""
    if device == "cpu" and not _utils.interpreter_active():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    return device


def _randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _assert_identical(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _check_quantize(x, code, blocksize):
    codes, absmax = tb.quantize_blockwise(x, code, blocksize)
    ref_codes, ref_absmax = ref.quantize_blockwise(x, code, blocksize)
    _assert_identical(absmax, ref_absmax)
    _assert_identical(codes, ref_codes)
    return codes, absmax


def _sizes(blocksize):
    # n = 1, n < blocksize, full blocks plus a partial one, and a few thousand elements
    # (several programs: a tile holds 2048 elements).
    return sorted({1, blocksize // 2 + 1, blocksize + 3, 3001 if blocksize < 2048 else 5003})


# --- registration ---------------------------------------------------------------------------


def test_backend_registered_and_available(dev):
    assert _dispatch.available_backends()["triton"]
    for op in ("quantize_blockwise", "dequantize_blockwise"):
        with _dispatch.use_backend("triton"):
            backend, fn = _dispatch.kernel_for(op, dev)
        assert backend == "triton"
        assert fn is getattr(tb, op)


# --- quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
def test_quantize_matches_reference(dev, blocksize, dtype):
    code = dynamic_map(device=dev)
    for i, n in enumerate(_sizes(blocksize)):
        _check_quantize(_randn(n, dtype, dev, seed=blocksize + i), code, blocksize)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_both_maps_over_ten_decades(dev, signed):
    # Magnitudes over 10 decades exercise the dense small entries of the dynamic map.
    g = torch.Generator().manual_seed(7)
    magnitudes = torch.logspace(-8, 2, 4100)[torch.randperm(4100, generator=g)]
    x = torch.randn(4100, generator=g) * magnitudes
    _check_quantize(x.to(dev), dynamic_map(signed, device=dev), 256)


def test_quantize_keeps_shape_and_takes_noncontiguous_input(dev):
    x = _randn((37, 29), torch.float16, dev, seed=3).t()  # a transposed view
    assert not x.is_contiguous()
    codes, absmax = _check_quantize(x, dynamic_map(device=dev), 64)
    assert codes.shape == (29, 37) and absmax.shape == (triton.cdiv(37 * 29, 64),)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf
def test_quantize_nan_inf_and_zero_blocks(dev):
    blocksize = 64
    x = _randn(5 * blocksize + 7, torch.float32, dev, seed=11)
    x[3] = float("nan")  # block 0: absmax NaN, every code 0
    x[blocksize : 2 * blocksize] = 0.0  # block 1: all zero, every code the index of 0.0
    x[2 * blocksize + 5] = float("inf")  # block 2: absmax inf; finite x -> 0.0, inf -> NaN -> 0
    x[3 * blocksize + 1] = float("-inf")
    x[3 * blocksize + 2] = float("nan")  # block 3: NaN beside -inf: absmax NaN
    x[-1] = float("nan")  # NaN in the partial last block
    code = dynamic_map(device=dev)
    codes, absmax = _check_quantize(x, code, blocksize)
    zero_index = int((code == 0).nonzero()[0])
    assert absmax[[0, 3, 5]].isnan().all()
    assert (codes[:blocksize] == 0).all()
    assert absmax[1] == 0 and (codes[blocksize : 2 * blocksize] == zero_index).all()
    assert absmax[2] == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_subnormal_blocks(dev, dtype):
    # Blocks of subnormals (all-subnormal, and subnormals under a tiny normal absmax) still
    # encode exactly: on a GPU this pins the guard against a flush-to-zero division; under
    # the interpreter it pins the exact bf16 widening (the interpreter's own mangles these).
    x = _randn(4 * 64, torch.float32, dev, seed=13)
    x[:64] *= 1e-40  # subnormal absmax
    x[64:128] *= 1e-39  # mostly subnormal
    x[128:192] *= 1e-33
    x[130] = 2e-32  # normal absmax, subnormal elements with codes away from 0.0
    _check_quantize(x.to(dtype), dynamic_map(device=dev), 64)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_ties_go_to_the_lower_index(dev, signed):
    # absmax = 1 (the block holds 1.0), so v = x exactly. At v = t_i the index is i (t_i is at
    # or below the midpoint, so a value at the exact midpoint ties low); one ulp above t_i
    # it is i + 1.
    code = dynamic_map(signed, device=dev)
    t = encode_thresholds(code)[:255]
    above = torch.nextafter(t, torch.full_like(t, torch.inf))
    x = torch.cat([t, above, torch.ones(1, device=dev)])
    codes, _ = _check_quantize(x, code, 512)
    i = torch.arange(255, device=dev)
    assert torch.equal(codes[:255].long(), i)
    assert torch.equal(codes[255:510].long(), i + 1)


def test_quantize_exact_midpoints_on_a_linear_code(dev):
    # A linear code whose midpoints are all exact float32 values: each tie goes low.
    code = (torch.arange(256, dtype=torch.float32) / 128 - 1).to(dev)
    mids = (code[:-1] + code[1:]) / 2
    codes, _ = _check_quantize(torch.cat([mids, torch.ones(1, device=dev)]), code, 256)
    assert torch.equal(codes[:255].long(), torch.arange(255, device=dev))


def test_thresholds_cached_per_code_version(dev):
    code = dynamic_map(device=dev)
    first = _utils.threshold_table(code)
    assert _utils.threshold_table(code) is first
    code.mul_(0.5)  # an in-place change bumps the version: the table is recomputed
    second = _utils.threshold_table(code)
    assert second is not first
    _assert_identical(second, encode_thresholds(code))


# --- dequantize -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
def test_dequantize_matches_reference(dev, blocksize, dtype):
    code = dynamic_map(device=dev)
    g = torch.Generator().manual_seed(blocksize)
    for n in _sizes(blocksize):
        codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(dev)
        absmax = (torch.rand(triton.cdiv(n, blocksize), generator=g) * 100).to(dev)
        out = tb.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
        _assert_identical(out, ref.dequantize_blockwise(codes, absmax, code, blocksize, dtype))


def test_dequantize_nan_absmax_and_shape(dev):
    code = dynamic_map(device=dev)
    codes = torch.randint(0, 256, (5, 7, 11), dtype=torch.uint8).to(dev)
    absmax = torch.tensor([2.0, float("nan"), 0.0, 0.5], device=dev)
    out = tb.dequantize_blockwise(codes, absmax, code, 128, torch.bfloat16)
    assert out.shape == (5, 7, 11)
    _assert_identical(out, ref.dequantize_blockwise(codes, absmax, code, 128, torch.bfloat16))
    assert out.view(-1)[128:256].isnan().all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp16 overflow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dequantize_rounds_to_nearest_even(dev, dtype):
    # Products exactly between two outputs (ties go to the even one), just off a tie, past
    # the largest finite output, and subnormal outputs. The interpreter's own fp32 -> bf16
    # conversion truncates, so this pins the kernel's rounding.
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).smallest_normal
    big = torch.finfo(torch.float32).max
    special = [1 + eps / 2, 1 + 3 * eps / 2, -(1 + eps / 2), 1 + eps / 2 + 2**-20, 2 - eps / 4,
               big, -big, 65520.0, tiny / 3, -tiny * 0.75, 0.0, -0.0]  # fmt: skip
    code = torch.zeros(256)
    code[: len(special)] = torch.tensor(special)
    code = code.to(dev)
    codes = torch.arange(256, dtype=torch.uint8, device=dev)
    out = tb.dequantize_blockwise(codes, torch.ones(1, device=dev), code, 256, dtype)
    expected = code.to(dtype)  # torch rounds to nearest even
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))  # bits: signed zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bound(dev, dtype):
    # The dynamic map's widest gap (near +-1) is 0.9/64 of the unit scale, so the round trip
    # error is below absmax / 128, plus the output dtype's rounding.
    code = dynamic_map(device=dev)
    x = _randn(3000, dtype, dev, seed=5)
    codes, absmax = tb.quantize_blockwise(x, code, 256)
    x_hat = tb.dequantize_blockwise(codes, absmax, code, 256, dtype)
    bound = absmax.repeat_interleave(256)[: x.numel()] * (1 / 128 + 2 * torch.finfo(dtype).eps)
    assert ((x_hat.float() - x.float()).abs() <= bound).all()


def test_column_offsets_past_int32_take_a_contiguous_copy():
    """The kernels offset columns as int32 index * stride: a transposed view of a huge tensor
    (column stride in the millions) is handed over as a contiguous copy, others as they are."""
    from lowprec_kernels.backends.triton._utils import int32_column_offsets

    huge = torch.empty_strided((2, 600), (1, 4_000_000), device="meta")
    assert int32_column_offsets(huge).stride() == (600, 1)
    view = torch.empty_strided((2, 600), (1, 3_000_000), device="meta")
    assert int32_column_offsets(view) is view

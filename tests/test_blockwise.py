"""Blockwise 8-bit quantize/dequantize: reference pinned by hand, every backend against it."""

import pytest
import torch
from conftest import noncontiguous, run_on

from lowprec_kernels import functional as LF
from lowprec_kernels._ops import BLOCKSIZES_8BIT

# ---------------------------------------------------------------- the reference, by hand


def test_reference_hand_case():
    code = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0] + [1.0] * 251)
    code[5:] = torch.linspace(1.0, 2.0, 251)  # keep it sorted; only the first 5 are reachable
    x = torch.tensor([2.0, -1.0, 0.5, -0.5] + [0.0] * 60 + [0.0] * 64)
    q, absmax = run_on("reference", LF.quantize_blockwise, x, code, 64)
    assert absmax.tolist() == [2.0, 0.0]
    # 2/2=1 -> idx 4; -1/2=-0.5 -> 1; 0.25 is the midpoint of 0 and 0.5 -> lower (2); -0.25 -> 1
    assert q[:4].tolist() == [4, 1, 2, 1]
    assert q[4:].tolist() == [2] * 124, "zeros and an all-zero block encode as the index of 0.0"
    deq = run_on("reference", LF.dequantize_blockwise, q, absmax, code, 64)
    assert deq[:4].tolist() == [2.0, -1.0, 0.0, -1.0]


def test_reference_nan_and_inf_blocks():
    x = torch.randn(256)
    x[3] = float("nan")
    x[70] = float("inf")
    q, absmax = run_on("reference", LF.quantize_blockwise, x, None, 64)
    assert torch.isnan(absmax[0]) and torch.isinf(absmax[1])
    assert q[:64].eq(0).all(), "a NaN block encodes every element as code 0"
    assert absmax[2:].isfinite().all()
    # As the docstring says: the infinite element's x / absmax is NaN (code 0, the map's most
    # negative entry), so it decodes to -inf; the rest of its block to 0 * inf = NaN.
    assert q[70].item() == 0
    deq = run_on("reference", LF.dequantize_blockwise, q, absmax, None, 64)
    assert deq[70].item() == float("-inf")
    assert deq[64:128][torch.arange(64) != 6].isnan().all()


def test_reference_roundtrip_error_bound():
    x = torch.randn(10_000)
    q, absmax = run_on("reference", LF.quantize_blockwise, x, None, 256)
    x_hat = run_on("reference", LF.dequantize_blockwise, q, absmax, None, 256)
    code = LF.dynamic_map()
    max_gap = (code[1:] - code[:-1]).max().item()
    err = (x - x_hat).abs() / absmax.repeat_interleave(256)[: x.numel()]
    assert err.max().item() <= max_gap / 2 + 1e-6


# ---------------------------------------------------------------- every backend vs reference

SIZES = [1, 63, 64, 65, 1000, 4096 * 2 + 17]


def _input(n, dtype, device, scale=3.0):
    return (torch.randn(n, device=device) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_8BIT)
@pytest.mark.parametrize("n", SIZES)
def test_quantize_matches_reference(device_backend, dtype, blocksize, n):
    device, backend = device_backend
    x = _input(n, dtype, device)
    code = LF.dynamic_map(device=device)
    q_ref, a_ref = run_on("reference", LF.quantize_blockwise, x, code, blocksize)
    q, a = run_on(backend, LF.quantize_blockwise, x, code, blocksize)
    assert q.shape == x.shape and q.dtype == torch.uint8 and a.dtype == torch.float32
    torch.testing.assert_close(a, a_ref, rtol=0, atol=0)
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} codes differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("n", SIZES)
def test_dequantize_matches_reference(device_backend, dtype, blocksize, n):
    device, backend = device_backend
    code = LF.dynamic_map(device=device)
    q = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    absmax = torch.rand(-(-n // blocksize), device=device) * 4 + 0.1
    ref = run_on("reference", LF.dequantize_blockwise, q, absmax, code, blocksize, dtype)
    out = run_on(backend, LF.dequantize_blockwise, q, absmax, code, blocksize, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_quantize_exact_ties_and_special_blocks(device_backend):
    device, backend = device_backend
    code = LF.dynamic_map(device=device)
    mids = ((code[:-1].double() + code[1:].double()) / 2).float()
    x = torch.cat(
        [
            torch.cat([mids[:63], torch.ones(1, device=device)]),  # exact midpoints, absmax 1
            torch.zeros(64, device=device),  # all-zero block
            torch.randn(64, device=device).index_fill_(
                0, torch.tensor([5], device=device), float("nan")
            ),
            torch.randn(64, device=device).index_fill_(
                0, torch.tensor([9], device=device), float("inf")
            ),
            torch.cat([mids[128:191], torch.ones(1, device=device)]),
        ]
    )
    q_ref, a_ref = run_on("reference", LF.quantize_blockwise, x, code, 64)
    q, a = run_on(backend, LF.quantize_blockwise, x, code, 64)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q, q_ref)


def test_noncontiguous_and_multidim(device_backend):
    device, backend = device_backend
    x = noncontiguous(torch.randn(7, 33, device=device))
    q_ref, a_ref = run_on("reference", LF.quantize_blockwise, x, None, 64)
    q, a = run_on(backend, LF.quantize_blockwise, x, None, 64)
    assert q.shape == (7, 33)
    assert torch.equal(q, q_ref) and torch.equal(a, a_ref)
    out = run_on(backend, LF.dequantize_blockwise, q, a, None, 64)
    torch.testing.assert_close(out, run_on("reference", LF.dequantize_blockwise, q, a, None, 64))


def test_unsigned_map(device_backend):
    device, backend = device_backend
    x = torch.rand(5000, device=device)
    code = LF.dynamic_map(signed=False, device=device)
    q_ref, a_ref = run_on("reference", LF.quantize_blockwise, x, code, 256)
    q, a = run_on(backend, LF.quantize_blockwise, x, code, 256)
    assert torch.equal(q, q_ref) and torch.equal(a, a_ref)

"""NF4 / FP4 reference: hand-computed codes and bytes, double quant, matmul, autograd, QuantState.

Everything here runs on the ``reference`` backend: it pins the definition that every other
backend is later compared against.
"""

import io
import json

import pytest
import torch
from conftest import noncontiguous, run_on

import lowprec_kernels as lpk
from lowprec_kernels import functional as LF
from lowprec_kernels._ops import BLOCKSIZES_4BIT
from lowprec_kernels.reference import codebooks
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF

NF4 = torch.tensor(codebooks.NF4_VALUES, dtype=torch.float32)
FP4 = torch.tensor(codebooks.FP4_VALUES, dtype=torch.float32)
CODES = {"nf4": NF4, "fp4": FP4}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def q4(w, blocksize=64, quant_type="nf4", double_quant=True):
    return run_on("reference", LF.quantize_4bit, w, blocksize, quant_type, double_quant)


def dq4(qw, st, dtype=None):
    return run_on("reference", LF.dequantize_4bit, qw, st, dtype)


def nibbles(packed: torch.Tensor, n: int) -> list[int]:
    """Unpacks by hand: byte i holds element 2i in its high nibble and 2i+1 in its low one."""
    out = []
    for b in packed.view(-1).tolist():
        out += [b >> 4, b & 0xF]
    return out[:n]


def randn_nonzero(*shape, scale=1.0):
    x = torch.randn(*shape) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def expected_codes(w: torch.Tensor, blocksize: int, quant_type: str):
    """Independent encoder: per-block absmax, then argmin distance to the codebook."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    v = (blocks / absmax.unsqueeze(1)).reshape(-1)[:n]
    code = CODES[quant_type].double()
    if quant_type == "nf4":
        idx = (v.double().unsqueeze(1) - code.unsqueeze(0)).abs().argmin(1)
    else:
        mags = code[:8]
        idx = (v.double().abs().unsqueeze(1) - mags.unsqueeze(0)).abs().argmin(1)
        idx = torch.where(flat < 0, idx | 8, idx)
    return idx, absmax


# ---------------------------------------------------------------- hand-computed small cases


def test_nf4_hand_case_2x3():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, -2.0, 0.1]])
    qw, st = q4(w, blocksize=32, quant_type="nf4", double_quant=False)
    # One block, absmax 2. v = w / 2 = [0.5, -0.25, 0.125, 0, -1, 0.05]:
    #  0.5   lies between 0.4407 (12) and 0.5626 (13), midpoint 0.5017 -> 12
    # -0.25  between -0.2844 (4) and -0.1848 (5), midpoint -0.2346     -> 4
    #  0.125 between 0.0796 (8) and 0.1609 (9), midpoint 0.1203        -> 9
    #  0 -> 7;  -1 -> 0;  0.05 between 0 (7) and 0.0796 (8), mid 0.0398 -> 8
    assert st.absmax.tolist() == [2.0]
    assert nibbles(qw, 6) == [12, 4, 9, 7, 0, 8]
    # element 2i in the high nibble: (12,4) -> 0xC4, (9,7) -> 0x97, (0,8) -> 0x08
    assert qw.shape == (3, 1) and qw.dtype == torch.uint8
    assert qw.view(-1).tolist() == [0xC4, 0x97, 0x08]
    expected = torch.tensor([NF4[i].item() * 2.0 for i in [12, 4, 9, 7, 0, 8]]).view(2, 3)
    assert torch.equal(dq4(qw, st), expected)


def test_nf4_odd_count_last_low_nibble_zero():
    w = torch.tensor([0.5, -1.0, 1.0, 0.0, 0.3])
    qw, st = q4(w, blocksize=32, quant_type="nf4", double_quant=False)
    # absmax 1: 0.5 -> 12, -1 -> 0, 1 -> 15, 0 -> 7, 0.3 (mid of 11/10 is 0.2920) -> 11
    assert qw.shape == (3, 1)
    assert qw.view(-1).tolist() == [0xC0, 0xF7, 0xB0], "the 6th (missing) nibble must be 0"
    assert dq4(qw, st).tolist() == [NF4[i].item() for i in [12, 0, 15, 7, 11]]


def test_nf4_exact_ties_go_to_lower_index():
    # code[8] / 2 is exactly the midpoint of code[7] = 0 and code[8]; likewise code[6] / 2.
    w = torch.tensor([1.0, NF4[8].item() / 2, NF4[6].item() / 2, -1.0])
    assert torch.tensor(w[1].item(), dtype=torch.float32).item() == NF4[8].item() / 2
    qw, _ = q4(w, blocksize=32, quant_type="nf4", double_quant=False)
    assert nibbles(qw, 4) == [15, 7, 6, 0]
    assert qw.view(-1).tolist() == [0xF7, 0x60]


def test_fp4_hand_case():
    w = torch.tensor([2.0, -1.0, 0.5, 0.3, -1.5, 0.0])
    qw, st = q4(w, blocksize=32, quant_type="fp4", double_quant=False)
    # FP4 magnitude index: 0:0, 1:1/192, 2:2/3, 3:1, 4:1/3, 5:1/2, 6:1/6, 7:1/4; bit 3 = sign.
    # v = w / 2 = [1, -0.5, 0.25, 0.15, -0.75, 0]
    #  1 -> 3;  -0.5 -> 5|8 = 13;  0.25 -> 7;  0.15 (between 1/192 and 1/6) -> 6
    # -0.75 (between 2/3 and 1, midpoint 5/6) -> 2|8 = 10;  0 -> 0
    assert nibbles(qw, 6) == [3, 13, 7, 6, 10, 0]
    assert qw.view(-1).tolist() == [0x3D, 0x76, 0xA0]
    torch.testing.assert_close(
        dq4(qw, st), torch.tensor([2.0, -1.0, 0.5, 1 / 3, -4 / 3, 0.0]), rtol=0, atol=1e-7
    )


def test_fp4_sign_bit_negative_zero_and_ties():
    h = NF4.new_tensor(1 / 192).item() / 2  # exactly the midpoint of magnitudes 0 and 1/192
    w = torch.tensor([1.0, -h, h, -0.0, -1e-4, 1e-4])
    qw, st = q4(w, blocksize=32, quant_type="fp4", double_quant=False)
    # 1 -> 3; -h: tie between 0 and 1/192 goes to the lower magnitude (0), sign set -> 8;
    # h -> 0; -0.0 is not < 0 -> 0 (no sign bit); -1e-4 rounds to magnitude 0, negative -> 8
    assert nibbles(qw, 6) == [3, 8, 0, 0, 8, 0]
    assert qw.view(-1).tolist() == [0x38, 0x00, 0x80]
    out = dq4(qw, st)
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_block_and_nan_block(quant_type):
    w = torch.zeros(96)
    w[64:] = torch.randn(32)
    w[70] = float("nan")
    qw, st = q4(w, blocksize=32, quant_type=quant_type, double_quant=False)
    zero_code = 7 if quant_type == "nf4" else 0
    assert st.absmax[0].item() == 0.0 and nibbles(qw, 32) == [zero_code] * 32
    assert torch.isnan(st.absmax[2]), "a NaN in a block makes that block's absmax NaN"
    assert st.absmax[:2].isfinite().all()


# ---------------------------------------------------------------- every blocksize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_codes_and_absmax_every_blocksize(blocksize, quant_type):
    w = randn_nonzero(7, 301)  # n = 2107: odd, n % blocksize != 0, blocks cross rows
    qw, st = q4(w, blocksize, quant_type, double_quant=False)
    idx, absmax = expected_codes(w, blocksize, quant_type)
    assert qw.shape == ((w.numel() + 1) // 2, 1)
    assert st.absmax.shape == (-(-w.numel() // blocksize),)
    assert torch.equal(st.absmax, absmax)
    got = torch.stack([qw.view(-1) >> 4, qw.view(-1) & 0xF], 1).view(-1)
    assert torch.equal(got[: w.numel()].long(), idx)
    assert got[-1].item() == 0, "odd count: last low nibble is 0"
    # Round trip: each element within half the widest codebook gap of its block's absmax.
    code = CODES[quant_type]
    mags = code.sort().values
    half_gap = (mags[1:] - mags[:-1]).max().item() / 2
    w_hat = dq4(qw, st)
    scale = absmax.repeat_interleave(blocksize)[: w.numel()].view_as(w)
    assert bool(((w - w_hat).abs() <= scale * half_gap * (1 + 1e-6)).all())


@pytest.mark.parametrize("shape", [(5,), (3, 4, 5), (2, 1, 3, 7)])
def test_any_rank(shape):
    w = randn_nonzero(*shape)
    qw, st = q4(w, 32)
    assert st.shape == torch.Size(shape) and qw.shape == ((w.numel() + 1) // 2, 1)
    out = dq4(qw, st)
    assert out.shape == shape
    assert torch.equal(out.reshape(-1), dq4(qw, q4(w.reshape(-1), 32)[1]))


# ---------------------------------------------------------------- double quant


def test_double_quant_hand_case():
    # Absmax per block of 32: [1, 2, 3, 6] -> offset = mean = 3, centered [-2, -1, 0, 3],
    # nested absmax 3, unit values [-2/3, -1/3, 0, 1].
    w = torch.zeros(128)
    for b, a in enumerate([1.0, 2.0, 3.0, 6.0]):
        w[b * 32] = a
        w[b * 32 + 1 : b * 32 + 32] = a / 4
    qw, st = q4(w, blocksize=32, quant_type="nf4", double_quant=True)
    assert st.nested and st.absmax.dtype == torch.uint8 and st.nested_blocksize == 256
    assert st.offset.item() == 3.0
    assert st.nested_absmax.tolist() == [3.0]
    dmap = codebooks.dynamic_map(True)
    assert torch.equal(st.nested_code, dmap)
    want = [(dmap.double() - u).abs().argmin().item() for u in (-2 / 3, -1 / 3, 0.0, 1.0)]
    assert st.absmax.tolist() == want
    assert dmap[want[3]].item() == 1.0 and dmap[want[2]].item() == 0.0
    decoded = dmap[st.absmax.long()] * 3.0 + 3.0
    assert decoded[2].item() == 3.0 and decoded[3].item() == 6.0
    # The 4-bit codes are those of the single-quant state; only the scales change.
    qw_single, _ = q4(w, blocksize=32, quant_type="nf4", double_quant=False)
    assert torch.equal(qw, qw_single)
    ref = NF4[torch.tensor(nibbles(qw, 128))] * decoded.repeat_interleave(32)
    assert torch.equal(dq4(qw, st), ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_double_quant_matches_definition(blocksize, quant_type):
    # 282 blocks of 64 -> two nested blocks of 256 (the second partial); n % 64 != 0.
    w = randn_nonzero(9, 2000, scale=0.1)
    qw, st = q4(w, blocksize, quant_type, double_quant=True)
    qw1, st1 = q4(w, blocksize, quant_type, double_quant=False)
    assert torch.equal(qw, qw1)
    absmax = st1.absmax
    nb = absmax.numel()
    # offset = mean(absmax) (float32 scalar)
    assert st.offset.dtype == torch.float32 and st.offset.numel() == 1
    torch.testing.assert_close(st.offset.double(), absmax.double().mean(), rtol=1e-6, atol=0)
    # nested codes: blockwise 8-bit of (absmax - offset), signed dynamic map, blocks of 256
    codes, nested_absmax = run_on(
        "reference", LF.quantize_blockwise, absmax - st.offset, LF.dynamic_map(True), 256
    )
    assert st.absmax.shape == (nb,) and st.nested_absmax.shape == (-(-nb // 256),)
    assert torch.equal(st.absmax, codes) and torch.equal(st.nested_absmax, nested_absmax)
    # decoded absmax = map[c] * nested_absmax[b // 256] + offset
    b = torch.arange(nb)
    decoded = st.nested_code[st.absmax.long()] * st.nested_absmax[b // 256] + st.offset
    w_hat = NF4 if quant_type == "nf4" else FP4
    w_hat = (
        w_hat[torch.tensor(nibbles(qw, w.numel()))]
        * decoded.repeat_interleave(blocksize)[: w.numel()]
    )
    assert torch.equal(dq4(qw, st), w_hat.view_as(w))
    # The absmax error is bounded by half the widest gap of the signed map times its scale.
    dmap = st.nested_code
    half_gap = (dmap[1:] - dmap[:-1]).max().item() / 2
    err = (decoded - absmax).abs()
    assert bool((err <= st.nested_absmax[b // 256] * half_gap + 1e-6).all())


def test_double_quant_bits_per_weight():
    w = randn_nonzero(64, 4096)
    qw, st = q4(w, 64, "nf4", double_quant=True)
    bits = (qw.numel() * 8 + st.absmax.numel() * 8 + st.nested_absmax.numel() * 32 + 32) / w.numel()
    assert bits == pytest.approx(4.127, abs=1e-3)


# ---------------------------------------------------------------- dtype


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_returns_state_dtype(dtype, double_quant):
    w = randn_nonzero(5, 67).to(dtype)
    qw, st = q4(w, 64, "nf4", double_quant)
    assert st.dtype == dtype
    out = dq4(qw, st)
    assert out.dtype == dtype and out.shape == w.shape
    fp32 = dq4(qw, st, torch.float32)
    assert fp32.dtype == torch.float32
    assert torch.equal(out, fp32.to(dtype)), "decoded in fp32, rounded once to st.dtype"


# ---------------------------------------------------------------- matmul_4bit


def _w_deq64(qw, st) -> torch.Tensor:
    return dq4(qw, st, torch.float32).double()


def _assert_matches_float64(y, y64, scale, dtype):
    """|y - y64| <= u(dtype) * |y64| + 1e-12 * scale, elementwise.

    The reference accumulates in float64 and rounds once into x's dtype, so the only error
    is that final rounding (at most one unit roundoff, relative) plus float64 summation
    noise, which the ``1e-12 * (|x| @ |W|.T + |bias|)`` term covers even under cancellation.
    fp16 results below its normal range round with absolute error <= 2**-25; added for fp16.
    """
    u = UNIT_ROUNDOFF[dtype]
    sub = 2.0**-25 if dtype == torch.float16 else 0.0
    bound = u * y64.abs() + 1e-12 * scale + sub
    err = (y.double() - y64).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3), (2, 1, 5)])
def test_matmul_4bit_vs_float64(lead, dtype, bias):
    out_f, in_f = 37, 100  # in % 64 != 0: blocks cross rows
    w = randn_nonzero(out_f, in_f)
    qw, st = q4(w, 64, "nf4", double_quant=True)
    x = randn_nonzero(*lead, in_f).to(dtype)
    b = randn_nonzero(out_f).to(dtype) if bias else None
    y = run_on("reference", LF.matmul_4bit, x, qw, st, b)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    W = _w_deq64(qw, st)
    y64 = x.double() @ W.T + (b.double() if bias else 0)
    scale = x.double().abs() @ W.abs().T + (b.double().abs() if bias else 0)
    _assert_matches_float64(y, y64, scale, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matmul_4bit_noncontiguous_and_single_quant(quant_type):
    w = randn_nonzero(19, 40)
    qw, st = q4(w, 32, quant_type, double_quant=False)
    x = noncontiguous(randn_nonzero(3, 40))
    y = run_on("reference", LF.matmul_4bit, x, qw, st)
    W = _w_deq64(qw, st)
    _assert_matches_float64(y, x.double() @ W.T, x.double().abs() @ W.abs().T, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 3)])
def test_matmul_4bit_autograd(lead, dtype):
    out_f, in_f = 33, 70
    w = randn_nonzero(out_f, in_f)
    qw, st = q4(w, 64, "nf4", double_quant=True)
    x = randn_nonzero(*lead, in_f).to(dtype).requires_grad_()
    b = randn_nonzero(out_f).to(dtype).requires_grad_()
    y = run_on("reference", LF.matmul_4bit, x, qw, st, b)
    gy = randn_nonzero(*y.shape).to(dtype)
    y.backward(gy)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert b.grad.dtype == dtype and b.grad.shape == b.shape
    # Manual float64 reference: grad_x = gy @ W_deq, grad_bias = gy summed over all rows.
    W = _w_deq64(qw, st)
    g64 = gy.double()
    gx64 = g64 @ W
    gb64 = g64.reshape(-1, out_f).sum(0)
    # The backward runs in x's dtype: W_deq rounded into it (u), products and sums (torch's
    # CPU matmul/sum accumulate fp16/bf16 in fp32: at most K * 2**-24 relative to the sum of
    # magnitudes), the result rounded once more (u). Bound: (2u + K * 2**-24) * sum |terms|,
    # doubled for margin.
    u = UNIT_ROUNDOFF[dtype]
    sx = g64.abs() @ W.abs()
    bound_x = 2 * (2 * u + out_f * 2.0**-24) * sx + 1e-30
    assert bool(((x.grad.double() - gx64).abs() <= bound_x).all())
    rows = g64.numel() // out_f
    sb = g64.abs().reshape(-1, out_f).sum(0)
    bound_b = 2 * (u + rows * 2.0**-24) * sb
    assert bool(((b.grad.double() - gb64).abs() <= bound_b).all())


def test_matmul_4bit_no_grad_needed_for_bias_only():
    w = randn_nonzero(8, 32)
    qw, st = q4(w, 32)
    x = randn_nonzero(2, 32)
    b = randn_nonzero(8).requires_grad_()
    run_on("reference", LF.matmul_4bit, x, qw, st, b).sum().backward()
    assert torch.equal(b.grad, torch.full((8,), 2.0))


# ---------------------------------------------------------------- QuantState dict

NESTED_KEYS = {"absmax", "quant_map", "nested_absmax", "nested_quant_map"}
HEADER_KEYS = {
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
}


def _header(d, quant_type):
    return json.loads(bytes(d[f"quant_state.bitsandbytes__{quant_type}"].tolist()).decode())


def _assert_same_state(a: lpk.QuantState, b: lpk.QuantState):
    assert (a.quant_type, a.blocksize, a.shape, a.dtype) == (
        b.quant_type,
        b.blocksize,
        b.shape,
        b.dtype,
    )
    assert a.nested == b.nested
    assert torch.equal(a.absmax, b.absmax) and torch.equal(a.code, b.code)
    if a.nested:
        assert torch.equal(a.nested_absmax, b.nested_absmax)
        assert torch.equal(a.nested_code, b.nested_code)
        assert a.nested_blocksize == b.nested_blocksize
        assert a.offset.item() == b.offset.item()


@pytest.fixture(params=[("nf4", torch.float16), ("fp4", torch.bfloat16), ("nf4", torch.float32)])
def state(request):
    quant_type, dtype = request.param
    w = randn_nonzero(13, 70).to(dtype)
    return (*q4(w, 64, quant_type, double_quant=True), quant_type, dtype)


def test_as_dict_keys_and_header(state):
    qw, st, quant_type, dtype = state
    d = st.as_dict()
    assert set(d) == NESTED_KEYS | {f"quant_state.bitsandbytes__{quant_type}"}
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    blob = d[f"quant_state.bitsandbytes__{quant_type}"]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    header = _header(d, quant_type)
    assert set(header) == HEADER_KEYS
    assert header["quant_type"] == quant_type
    assert header["blocksize"] == 64
    assert header["dtype"] == str(dtype).removeprefix("torch.")
    assert header["shape"] == [13, 70]
    assert header["nested_blocksize"] == 256
    assert header["nested_dtype"] == "float32"
    assert header["nested_offset"] == st.offset.item()
    assert d["absmax"].dtype == torch.uint8 and d["nested_absmax"].dtype == torch.float32


def test_as_dict_without_double_quant():
    w = randn_nonzero(4, 64)
    _, st = q4(w, 64, "fp4", double_quant=False)
    d = st.as_dict()
    assert set(d) == {"absmax", "quant_map", "quant_state.bitsandbytes__fp4"}
    assert set(_header(d, "fp4")) == {"quant_type", "blocksize", "dtype", "shape"}
    st2 = lpk.QuantState.from_dict(d)
    assert not st2.nested
    _assert_same_state(st, st2)


def _snapshot(d):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def _assert_unchanged(d, snap):
    assert list(d) == list(snap)
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, snap[k])
        else:
            assert v == snap[k]


def test_from_dict_packed_roundtrip(state):
    qw, st, _, _ = state
    d = st.as_dict()
    snap = _snapshot(d)
    st2 = lpk.QuantState.from_dict(d)
    _assert_unchanged(d, snap)
    _assert_same_state(st, st2)
    assert torch.equal(dq4(qw, st2), dq4(qw, st))


def test_from_dict_with_prefix(state):
    qw, st, _, _ = state
    d = {f"weight.{k}": v for k, v in st.as_dict().items()}
    snap = _snapshot(d)
    st2 = lpk.QuantState.from_dict(d)
    _assert_unchanged(d, snap)
    _assert_same_state(st, st2)


def _unpacked(st):
    """bitsandbytes' ``as_dict(packed=False)`` layout: scalars as plain Python values."""
    return {
        "quant_type": st.quant_type,
        "absmax": st.absmax,
        "blocksize": st.blocksize,
        "quant_map": st.code,
        "dtype": str(st.dtype).removeprefix("torch."),
        "shape": tuple(st.shape),
        "nested_absmax": st.nested_absmax,
        "nested_blocksize": st.nested_blocksize,
        "nested_quant_map": st.nested_code,
        "nested_dtype": "float32",
        "nested_offset": st.offset.item(),
    }


def test_from_dict_unpacked(state):
    qw, st, _, _ = state
    d = _unpacked(st)
    snap = _snapshot(d)
    st2 = lpk.QuantState.from_dict(d)
    _assert_unchanged(d, snap)
    _assert_same_state(st, st2)


def test_as_dict_unpacked_round_trip(state):
    """as_dict(packed=False) (bitsandbytes' signature; it raised TypeError) gives the
    unpacked layout; packed=True is the default."""
    qw, st, _, _ = state
    unpacked = st.as_dict(packed=False)
    want = _unpacked(st)
    assert set(unpacked) == set(want) if st.nested else set(unpacked) <= set(want)
    _assert_same_state(st, lpk.QuantState.from_dict(unpacked))
    packed = st.as_dict(packed=True)
    assert list(packed) == list(st.as_dict()) and all(
        torch.equal(packed[k], v) for k, v in st.as_dict().items()
    )


def test_from_dict_takes_bitsandbytes_keyword_and_a_tensor_offset(state):
    """bitsandbytes calls from_dict(qs_dict=..., device=...), and its unpacked dicts may hold
    the offset as a 0-dim tensor (which made a non-nested state of uint8 absmax codes)."""
    qw, st, _, _ = state
    d = _unpacked(st)
    if st.nested:
        d["nested_offset"] = st.offset.clone()
    st2 = lpk.QuantState.from_dict(qs_dict=d, device="cpu")
    _assert_same_state(st, st2)
    assert torch.equal(dq4(qw, st2), dq4(qw, st))


def test_from_dict_header_key_and_layout(state):
    """The packed key must name the header's quant type (an '...__int8' key was taken); a
    header tensor of another shape holds the same bytes (a 2-D one raised TypeError)."""
    qw, st, quant_type, _ = state
    d = st.as_dict()
    header = d.pop(f"quant_state.bitsandbytes__{quant_type}")
    with pytest.raises(ValueError, match="bitsandbytes__int8"):
        lpk.QuantState.from_dict({**d, "quant_state.bitsandbytes__int8": header})
    st2 = lpk.QuantState.from_dict(
        {**d, f"quant_state.bitsandbytes__{quant_type}": header.reshape(1, -1)}
    )
    _assert_same_state(st, st2)


def test_from_dict_nested_tensors_without_an_offset_raises(state):
    _, st, quant_type, _ = state
    if not st.nested:
        pytest.skip("needs double quantization")
    d = _unpacked(st)
    del d["nested_offset"]
    with pytest.raises(ValueError, match="nested_offset"):
        lpk.QuantState.from_dict(d)


def test_moves_keep_a_nested_blocksize_other_than_256():
    """A state read by from_dict may carry any nested blocksize of the format; QuantState.to
    and to_empty must keep it (they build a new state field by field)."""
    qw, single = LF.quantize_4bit(torch.randn(64, 64), 64, "nf4", double_quant=False)
    offset = single.absmax.mean()
    nested_code = LF.dynamic_map(signed=True)
    codes, nested_absmax = LF.quantize_blockwise(single.absmax - offset, nested_code, 64)
    st = lpk.QuantState(quant_type="nf4", blocksize=64, shape=single.shape, dtype=single.dtype,
                        absmax=codes, code=single.code, nested_absmax=nested_absmax,
                        nested_code=nested_code, nested_blocksize=64, offset=offset)  # fmt: skip
    _assert_same_state(st.to("cpu"), st)
    assert st.to_empty("cpu").nested_blocksize == 64
    assert torch.equal(dq4(qw, st.to("cpu")), dq4(qw, st))


def test_quantized_states_do_not_share_their_codebook():
    """Each QuantState's codebook is its own tensor: changing one in place (as loading a
    checkpoint into the state dict's tensors does) leaves later states' codebooks alone."""
    for quant_type in ("nf4", "fp4"):
        _, st = LF.quantize_4bit(torch.randn(8, 64), 64, quant_type)
        want = st.code.clone()
        st.code.mul_(2.0)
        _, later = LF.quantize_4bit(torch.randn(8, 64), 64, quant_type)
        assert torch.equal(later.code, want)


def test_from_dict_after_torch_save_weights_only(state):
    qw, st, _, _ = state
    buf = io.BytesIO()
    torch.save({"weight": qw, **{f"weight.{k}": v for k, v in st.as_dict().items()}}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    st2 = lpk.QuantState.from_dict({k: v for k, v in loaded.items() if k != "weight"})
    _assert_same_state(st, st2)
    assert torch.equal(dq4(loaded["weight"], st2), dq4(qw, st))


def test_from_dict_through_safetensors(state):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    qw, st, _, _ = state
    blob = safetensors_torch.save({"weight": qw, **st.as_dict()})
    loaded = safetensors_torch.load(blob)
    st2 = lpk.QuantState.from_dict(loaded)
    _assert_same_state(st, st2)
    assert torch.equal(dq4(loaded["weight"], st2), dq4(qw, st))


@pytest.mark.parametrize("drop", ["absmax", "quant_map", "nested_absmax", "nested_quant_map"])
def test_from_dict_truncated_raises(state, drop):
    _, st, _, _ = state
    d = st.as_dict()
    del d[drop]
    with pytest.raises(ValueError, match=drop):
        lpk.QuantState.from_dict(d)


def test_from_dict_without_header_raises(state):
    _, st, quant_type, _ = state
    d = st.as_dict()
    del d[f"quant_state.bitsandbytes__{quant_type}"]
    with pytest.raises(ValueError, match="quant_state"):
        lpk.QuantState.from_dict(d)


def test_from_dict_corrupt_header_raises(state):
    _, st, quant_type, _ = state
    d = st.as_dict()
    key = f"quant_state.bitsandbytes__{quant_type}"
    d[key] = d[key][: d[key].numel() // 2]  # truncated JSON
    with pytest.raises(ValueError, match="JSON"):
        lpk.QuantState.from_dict(d)


# ---------------------------------------------------------------- bitsandbytes (optional)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_interop(quant_type, double_quant):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = randn_nonzero(24, 200)  # n % 64 != 0
    qw, st = q4(w, 64, quant_type, double_quant)
    ours = dq4(qw, st)
    # Our dict loads in bitsandbytes, and their dequantize of our codes equals ours.
    bst = bnbF.QuantState.from_dict(st.as_dict(), device=torch.device("cpu"))
    theirs = bnbF.dequantize_4bit(qw, bst)
    assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
    # Same products code * absmax in fp32; with double quant the absmax decode is
    # map * nested_absmax + offset in both, which bitsandbytes may fuse: allow 2 ulp.
    torch.testing.assert_close(theirs, ours, rtol=2**-22, atol=0)
    # Their packed dict equals ours key for key; the header JSON carries the same fields.
    bd = bst.as_dict(packed=True)
    d = st.as_dict()
    assert set(bd) == set(d)
    assert _header(bd, quant_type) == _header(d, quant_type)
    for k in d:
        if not k.startswith("quant_state."):
            assert torch.equal(bd[k], d[k]), k
    # Their quantization loads here and decodes as they decode it.
    bqw, bst2 = bnbF.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    st2 = lpk.QuantState.from_dict(bst2.as_dict(packed=True))
    torch.testing.assert_close(dq4(bqw, st2), bnbF.dequantize_4bit(bqw, bst2), rtol=2**-22, atol=0)

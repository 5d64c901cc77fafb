"""8-bit Adam / AdamW reference step against hand-written float32/float64 Adam.

Everything runs on the ``reference`` backend (``torch.ops.lowprec.adam8bit_step_``): it pins
the definition that every backend's fused kernel is compared against.
"""

import math

import pytest
import torch
from conftest import run_on

from lowprec_kernels import functional as LF
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF

B1, B2, EPS = 0.9, 0.999, 1e-8
U32 = UNIT_ROUNDOFF[torch.float32]


def randn_nonzero(*shape, scale=1.0):
    x = torch.randn(*shape) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


class Adam8:
    """The op's tensors for one parameter: fresh zero state (bitsandbytes' initial state)."""

    def __init__(self, p, blocksize=256):
        n = p.numel()
        nb = -(-n // blocksize)
        self.p = p
        self.blocksize = blocksize
        self.state1 = torch.zeros(p.shape, dtype=torch.uint8)
        self.state2 = torch.zeros(p.shape, dtype=torch.uint8)
        self.absmax1 = torch.zeros(nb)
        self.absmax2 = torch.zeros(nb)
        self.qmap1 = LF.dynamic_map(signed=True)
        self.qmap2 = LF.dynamic_map(signed=False)
        self.step = torch.zeros(())
        self.skipped = torch.zeros(())

    def tensors(self):
        return (
            self.p, self.state1, self.state2, self.absmax1, self.absmax2, self.step, self.skipped,
        )  # fmt: skip

    def __call__(self, g, lr=1e-3, weight_decay=0.0, decoupled=True, gnorm_scale=1.0):
        run_on(
            "reference", torch.ops.lowprec.adam8bit_step_,
            self.p, g, self.state1, self.state2, self.absmax1, self.absmax2, self.qmap1,
            self.qmap2, self.step, self.skipped, lr, B1, B2, EPS, weight_decay, decoupled,
            gnorm_scale, self.blocksize,
        )  # fmt: skip

    def m(self):
        return run_on(
            "reference", LF.dequantize_blockwise,
            self.state1, self.absmax1, self.qmap1, self.blocksize, torch.float32,
        )  # fmt: skip

    def v(self):
        return run_on(
            "reference", LF.dequantize_blockwise,
            self.state2, self.absmax2, self.qmap2, self.blocksize, torch.float32,
        )  # fmt: skip


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def adam_fp32(p, g, m, v, t, lr, wd=0.0, decoupled=True, gnorm=1.0):
    """The documented step written out: coefficients in float64 rounded once to float32,
    float32 arithmetic in the documented order."""
    g = g * f32(gnorm)
    if not decoupled and wd:
        g = g + f32(wd) * p
    m = f32(B1) * m + f32(1 - B1) * g
    v = f32(B2) * v + f32(1 - B2) * g * g
    if decoupled and wd:
        p = p * f32(1 - lr * wd)
    denom = torch.sqrt(v.double()).float() * f32(1 / math.sqrt(1 - B2**t)) + f32(EPS)
    p = p - f32(lr / (1 - B1**t)) * (m / denom)
    return p, m, v


def adam_fp64(p, g, m, v, t, lr, wd=0.0, decoupled=True, gnorm=1.0):
    """Plain float64 Adam / AdamW."""
    p, g, m, v = (a.double() for a in (p, g, m, v))
    g = g * gnorm
    if not decoupled:
        g = g + wd * p
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    if decoupled:
        p = p * (1 - lr * wd)
    p = p - lr * (m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)
    return p, m, v


def quantize(x, code, blocksize):
    return run_on("reference", LF.quantize_blockwise, x, code, blocksize)


def assert_p_close(p, p64, lr, dtype=torch.float32):
    """fp32 arithmetic of a few roundings on |p| and on the update (|update| <= ~lr), then
    one rounding into p's dtype: (u(dtype) + 4 u32) |p| + 1e-5 lr."""
    bound = (UNIT_ROUNDOFF[dtype] + 4 * U32) * p64.abs() + 1e-5 * lr
    err = (p.double() - p64).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


# ---------------------------------------------------------------- first step, exact


@pytest.mark.parametrize("blocksize", [64, 256, 2048])
@pytest.mark.parametrize("n", [1, 1000, 4099])
def test_first_step_states_exact_and_p_vs_float64(n, blocksize):
    p0 = randn_nonzero(n)
    g = randn_nonzero(n)
    opt = Adam8(p0.clone(), blocksize)
    opt(g, lr=1e-3)
    assert opt.step.item() == 1 and opt.skipped.item() == 0
    # From zero state: m = (1 - b1) g, v = ((1 - b2) g) g in float32.
    m = f32(1 - B1) * g
    v = f32(1 - B2) * g * g
    c1, a1 = quantize(m, opt.qmap1, blocksize)
    c2, a2 = quantize(v, opt.qmap2, blocksize)
    assert torch.equal(opt.absmax1, a1) and torch.equal(opt.absmax2, a2)
    assert torch.equal(opt.state1, c1), f"{(opt.state1 != c1).sum()} m codes differ"
    assert torch.equal(opt.state2, c2), f"{(opt.state2 != c2).sum()} v codes differ"
    # p is updated from the unquantized m, v of this step: float64 Adam within fp32 rounding.
    p64, _, _ = adam_fp64(p0, g, torch.zeros(n), torch.zeros(n), 1, 1e-3)
    assert_p_close(opt.p, p64, 1e-3)
    assert opt.p.dtype == torch.float32


def test_first_step_moves_by_lr_times_sign():
    # Bias-corrected first step: m_hat / sqrt(v_hat) = g / |g| (eps is negligible here).
    p0 = randn_nonzero(300)
    g = randn_nonzero(300) + 2 * torch.sign(randn_nonzero(300))
    opt = Adam8(p0.clone())
    opt(g, lr=0.01)
    torch.testing.assert_close(opt.p - p0, -0.01 * torch.sign(g), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- several steps


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("n", [777, 5000])
def test_several_steps_requantize_each_step(n, decoupled):
    """Each step from the decoded 8-bit states: codes equal quantize_blockwise of the
    documented float32 m, v; p within fp32 rounding of float64 Adam from those states."""
    lr, wd, steps = 1e-3, 0.01, 6
    p = randn_nonzero(n)
    opt = Adam8(p.clone())
    drift = randn_nonzero(n)  # a persistent direction so m does not average to zero
    p_dense, m_dense, v_dense = p.double(), torch.zeros(n).double(), torch.zeros(n).double()
    for t in range(1, steps + 1):
        g = drift + 0.5 * randn_nonzero(n)
        m_q, v_q, p_before = opt.m(), opt.v(), opt.p.clone()
        p32, m32, v32 = adam_fp32(p_before, g, m_q, v_q, t, lr, wd, decoupled)
        p64, _, _ = adam_fp64(p_before, g, m_q, v_q, t, lr, wd, decoupled)
        opt(g, lr=lr, weight_decay=wd, decoupled=decoupled)
        assert opt.step.item() == t
        c1, a1 = quantize(m32, opt.qmap1, 256)
        c2, a2 = quantize(v32, opt.qmap2, 256)
        assert torch.equal(opt.absmax1, a1) and torch.equal(opt.absmax2, a2)
        assert torch.equal(opt.state1, c1) and torch.equal(opt.state2, c2), f"step {t}"
        # p bit for bit as the documented float32 step (update scalars rounded once).
        assert torch.equal(opt.p, p32), f"step {t}: {(opt.p != p32).sum()} p differ"
        assert_p_close(opt.p, p64, lr)
        assert torch.allclose(opt.p, p32, rtol=0, atol=4 * U32 * p32.abs().max().item())
        p_dense, m_dense, v_dense = adam_fp64(p_dense, g, m_dense, v_dense, t, lr, wd, decoupled)
    # Against dense float64 Adam: the 8-bit states perturb m by up to half a map gap times
    # the block absmax (a few % of m for most elements, more for elements far below the
    # block's absmax), so each step's update (<= ~lr) can be off by a fraction of lr.
    # Measured here: mean |dp| ~ 0.006 lr per step, max ~ 0.05 lr per step; bounds 5x that.
    dp = (opt.p.double() - p_dense).abs()
    assert dp.mean().item() < 0.03 * lr * steps
    assert dp.max().item() < 0.25 * lr * steps
    # The dense states decode close to the 8-bit ones relative to each block's absmax
    # (measured max 0.023 for m, 0.01 for v; one half gap of the signed map near 1 is 0.007).
    for dec, dense, am in ((opt.m(), m_dense, opt.absmax1), (opt.v(), v_dense, opt.absmax2)):
        scale = am.double().repeat_interleave(256)[:n]
        assert ((dec.double() - dense).abs() / scale).max().item() < 0.1


# ---------------------------------------------------------------- Adam vs AdamW, gnorm_scale


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_vs_adamw_weight_decay(decoupled):
    n, lr, wd = 1000, 1e-2, 0.1
    p0 = randn_nonzero(n)
    g = randn_nonzero(n) * 0.05  # small g so that wd * p matters for Adam
    opt = Adam8(p0.clone())
    opt(g, lr=lr, weight_decay=wd, decoupled=decoupled)
    z = torch.zeros(n)
    p64, m64, _ = adam_fp64(p0, g, z, z, 1, lr, wd, decoupled)
    assert_p_close(opt.p, p64, lr)
    _, m32, v32 = adam_fp32(p0, g, z, z, 1, lr, wd, decoupled)
    assert torch.equal(opt.state1, quantize(m32, opt.qmap1, 256)[0])
    assert torch.equal(opt.state2, quantize(v32, opt.qmap2, 256)[0])
    # The other variant gives a different result.
    p_other, _, _ = adam_fp64(p0, g, z, z, 1, lr, wd, not decoupled)
    assert (p64 - p_other).abs().max().item() > 100 * lr * 1e-5
    if decoupled:
        # AdamW decays p before the update: p1 = p0 (1 - lr wd) - lr sign(g) at step 1
        expect = p0.double() * (1 - lr * wd) - lr * torch.sign(g).double()
        torch.testing.assert_close(opt.p.double(), expect, rtol=0, atol=1e-5 * lr + 1e-6)
    else:
        # Adam adds wd * p to g: m's block absmax is that of (1 - b1) (g + wd p), not of g
        gw = (g.double() + wd * p0.double()) * (1 - B1)
        want = gw.view(-1)[:768].view(3, 256).abs().amax(1)
        torch.testing.assert_close(opt.absmax1[:3].double(), want, rtol=4 * U32, atol=0)
        assert not torch.allclose(
            opt.absmax1[:3].double(), (g.double() * (1 - B1))[:768].view(3, 256).abs().amax(1)
        )


def test_gnorm_scale_power_of_two_is_exact():
    p0, g = randn_nonzero(700), randn_nonzero(700)
    a, b = Adam8(p0.clone()), Adam8(p0.clone())
    a(g, gnorm_scale=0.5)
    b(g * 0.5)
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("decoupled", [True, False])
def test_gnorm_scale_vs_float64(decoupled):
    n, lr, wd, gs = 900, 1e-3, 0.05, 0.3
    p0, g = randn_nonzero(n), randn_nonzero(n)
    opt = Adam8(p0.clone())
    opt(g, lr=lr, weight_decay=wd, decoupled=decoupled, gnorm_scale=gs)
    z = torch.zeros(n)
    p64, _, _ = adam_fp64(p0, g, z, z, 1, lr, wd, decoupled, gs)
    assert_p_close(opt.p, p64, lr)
    _, m32, v32 = adam_fp32(p0, g, z, z, 1, lr, wd, decoupled, gs)
    c1, a1 = quantize(m32, opt.qmap1, 256)
    assert torch.equal(opt.state1, c1) and torch.equal(opt.absmax1, a1)
    # gnorm_scale scales g before the weight decay term: m's absmax is that of gs g (+ wd p)
    gg = (g.double() * gs + (0 if decoupled else wd * p0.double())) * (1 - B1)
    want = gg[:768].view(3, 256).abs().amax(1)
    torch.testing.assert_close(opt.absmax1[:3].double(), want, rtol=4 * U32, atol=0)


# ---------------------------------------------------------------- step counter, skipping


def test_step_counter_increments():
    opt = Adam8(randn_nonzero(300))
    for t in range(1, 4):
        opt(randn_nonzero(300))
        assert opt.step.item() == t
    assert opt.skipped.item() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_skips(bad):
    n = 1000
    opt = Adam8(randn_nonzero(n))
    opt(randn_nonzero(n))  # non-trivial state first
    before = [t.clone() for t in opt.tensors()]
    g = randn_nonzero(n)
    g[517] = bad
    opt(g)
    p, s1, s2, a1, a2, step, skipped = opt.tensors()
    for name, now, was in zip(["p", "state1", "state2", "absmax1", "absmax2", "step"],
                              [p, s1, s2, a1, a2, step], before):  # fmt: skip
        assert torch.equal(now, was), f"{name} changed on a skipped step"
    assert skipped.item() == before[-1].item() + 1
    # the next finite step proceeds as step 2
    opt(randn_nonzero(n))
    assert opt.step.item() == 2 and opt.skipped.item() == 1
    assert opt.p.isfinite().all() and opt.absmax1.isfinite().all()


def test_skip_counts_accumulate():
    opt = Adam8(randn_nonzero(64))
    g = randn_nonzero(64)
    g[0] = float("nan")
    opt(g)
    opt(g)
    assert opt.skipped.item() == 2 and opt.step.item() == 0
    assert opt.absmax1.eq(0).all() and opt.state1.eq(0).all()


# ---------------------------------------------------------------- fp16 / bf16 parameters


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_params_math_in_fp32(dtype, decoupled):
    n, lr, wd = 1500, 1e-2, 0.01
    p0 = randn_nonzero(n).to(dtype)
    g = randn_nonzero(n).to(dtype)
    opt = Adam8(p0.clone())
    opt(g, lr=lr, weight_decay=wd, decoupled=decoupled)
    assert opt.p.dtype == dtype
    z = torch.zeros(n)
    # float32 math on the exact fp16/bf16 values, rounded once into p's dtype
    p32, m32, v32 = adam_fp32(p0.float(), g.float(), z, z, 1, lr, wd, decoupled)
    assert torch.equal(opt.p, p32.to(dtype))
    p64, _, _ = adam_fp64(p0, g, z, z, 1, lr, wd, decoupled)
    assert_p_close(opt.p, p64, lr, dtype)
    assert torch.equal(opt.state1, quantize(m32, opt.qmap1, 256)[0])
    assert torch.equal(opt.state2, quantize(v32, opt.qmap2, 256)[0])

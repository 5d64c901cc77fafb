"""The Triton 8-bit Adam / AdamW kernel (and its float32-state sibling, adam_multi_step_)
against the reference, step by step, bit for bit.

Without a GPU the kernels run under the Triton interpreter on CPU tensors. Everything the
kernel writes (p, codes, absmax, step, skipped) must equal the reference exactly: the
kernel does the reference's float32 operations in the same order with IEEE division and
square root and no FMA contraction, so no tolerance is needed. The GPU code path is
checked as far as a CPU allows by compiling the kernels ahead of time for sm_90 and
reading the PTX (test_gpu_code_*).
"""

import pytest
import torch
from conftest import (
    assert_optimizer_float_states_take,
    backend_params,
    noncontiguous,
    run_on,
    run_sm90_compile_script,
)

from lowprec_kernels import _dispatch
from lowprec_kernels import functional as LF
from lowprec_kernels._ops import num_blocks

TRITON_PARAMS = [p for p in backend_params() if p.values[0][1] == "triton"]
B1, B2, EPS = 0.9, 0.999, 1e-8


@pytest.fixture(params=TRITON_PARAMS)
def device(request):
    return request.param[0]


def randn_nonzero(shape, dtype, device, scale=1.0):
    x = torch.randn(shape, device=device) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


class Tensors:
    """One parameter's op arguments, starting from bitsandbytes' zero state."""

    def __init__(self, p, blocksize):
        nb = num_blocks(p.numel(), blocksize)
        self.p = p
        self.state1 = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        self.state2 = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        self.absmax1 = torch.zeros(nb, device=p.device)
        self.absmax2 = torch.zeros(nb, device=p.device)
        self.step = torch.zeros((), device=p.device)
        self.skipped = torch.zeros((), device=p.device)

    NAMES = ("p", "state1", "state2", "absmax1", "absmax2", "step", "skipped")

    def clone(self):
        twin = object.__new__(Tensors)
        for name in self.NAMES:
            setattr(twin, name, getattr(self, name).clone())
        return twin

    def assert_equal(self, other, what):
        for name in self.NAMES:
            a, b = getattr(self, name), getattr(other, name)
            assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name}"
            if a.is_floating_point():  # bit patterns: -0.0 against +0.0, NaN payloads
                a, b = (x.view({2: torch.int16, 4: torch.int32}[x.element_size()]) for x in (a, b))
            diff = a != b
            assert not diff.any(), f"{what}: {name} differs in {int(diff.sum())} elements"


def multi_step(backend, group, grads, lr=1e-2, wd=0.0, decoupled=True, gnorm=1.0, bs=256):
    device = group[0].p.device
    qmap1, qmap2 = LF.dynamic_map(True, device), LF.dynamic_map(False, device)
    run_on(
        backend, torch.ops.lowprec.adam8bit_multi_step_,
        [t.p for t in group], grads, [t.state1 for t in group], [t.state2 for t in group],
        [t.absmax1 for t in group], [t.absmax2 for t in group], qmap1, qmap2,
        [t.step for t in group], [t.skipped for t in group],
        lr, B1, B2, EPS, wd, decoupled, gnorm, bs,
    )  # fmt: skip


def run_both(group, steps, bad_step=None, grad_of=None, op=None, **hyper):
    """Runs ``steps`` steps of ``op`` (default: ``multi_step``) on the reference and on Triton
    from the same start, comparing every tensor after every step; at ``bad_step`` tensor 1
    gets a NaN/Inf gradient; Triton gets ``grad_of(g)`` where given."""
    op = op or multi_step
    ours = [t.clone() for t in group]
    for step in range(steps):
        grads = [randn_nonzero(t.p.shape, t.p.dtype, t.p.device) for t in group]
        if step == bad_step:
            grads[1].view(-1)[grads[1].numel() // 2] = float("inf") if step % 2 else float("nan")
        op("reference", group, grads, **hyper)
        op("triton", ours, [grad_of(g) for g in grads] if grad_of else grads, **hyper)
        for i, (a, b) in enumerate(zip(ours, group)):
            a.assert_equal(b, f"step {step}, tensor {i}")
    return ours


# Sizes with tails (n % blocksize != 0), a single element, a tensor of exactly one
# program's tile and one of several tiles (both the unmasked and the masked path).
SHAPES = [(1,), (77,), (3, 17, 5), (2048,), (4099,)]


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_multi_step_equals_reference_step_by_step(device, dtype, decoupled):
    group = [Tensors(randn_nonzero(s, dtype, device), 256) for s in SHAPES]
    ours = run_both(group, steps=4, bad_step=2, wd=0.05, decoupled=decoupled, lr=3e-3)
    assert [t.step.item() for t in ours] == [4, 3, 4, 4, 4]
    assert [t.skipped.item() for t in ours] == [0, 1, 0, 0, 0]


@pytest.mark.parametrize("blocksize", [64, 512, 4096])
def test_blocksizes(device, blocksize):
    group = [Tensors(randn_nonzero(s, torch.float32, device), blocksize) for s in [(100,), (5000,)]]
    run_both(group, steps=2, bs=blocksize, wd=0.01)


def test_no_weight_decay_and_gnorm_scale(device):
    group = [Tensors(randn_nonzero(s, torch.float32, device), 256) for s in [(300,), (1000,)]]
    run_both(group, steps=2, wd=0.0, gnorm=0.37)
    run_both(group, steps=2, wd=0.0, decoupled=False, gnorm=3.0)


def test_mixed_dtypes_in_one_call(device):
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32]
    group = [Tensors(randn_nonzero((700 + i,), d, device), 256) for i, d in enumerate(dtypes)]
    run_both(group, steps=2, bad_step=1, wd=0.01)


def test_extreme_values(device):
    """Large, tiny (subnormal v) and zero gradients, a zero block: codes still exact."""
    p = randn_nonzero((1024,), torch.float32, device)
    group = [Tensors(p, 256), Tensors(p.clone(), 256)]
    ours = [t.clone() for t in group]
    g = randn_nonzero((1024,), torch.float32, device)
    g[:256] = 0.0  # an all-zero block: absmax 0, every code the index of 0.0
    g[256:512] *= 1e-22  # g*g is subnormal
    g[512:768] *= 1e18  # g*g near the top of the float32 range
    grads = [g, -g]
    multi_step("reference", group, grads, lr=0.1)
    multi_step("triton", ours, grads, lr=0.1)
    for a, b in zip(ours, group):
        a.assert_equal(b, "extreme values")
    assert ours[0].absmax1[0].item() == 0.0


def test_fractional_step_count(device):
    """A loaded step count of 2.5 is read as int(step) + 1 = 3 and stored as 3, as the
    reference and the CPU and CUDA kernels do."""
    group = [Tensors(randn_nonzero(s, torch.float32, device), 256) for s in [(300,), (77,)]]
    for t in group:
        t.step.fill_(2.5)
    ours = run_both(group, steps=2, wd=0.01)
    assert [t.step.item() for t in ours] == [4.0, 4.0]


def test_single_tensor_op(device):
    t = Tensors(randn_nonzero((3, 333), torch.bfloat16, device), 128)
    ours = t.clone()
    qmap1, qmap2 = LF.dynamic_map(True, device), LF.dynamic_map(False, device)
    for _ in range(2):
        g = randn_nonzero((3, 333), torch.bfloat16, device)
        for backend, x in (("reference", t), ("triton", ours)):
            run_on(
                backend, LF.adam8bit_step_, x.p, g, x.state1, x.state2, x.absmax1, x.absmax2,
                qmap1, qmap2, x.step, x.skipped, lr=1e-2, beta1=B1, beta2=B2, eps=EPS,
                weight_decay=0.1, decoupled=False, blocksize=128,
            )  # fmt: skip
        ours.assert_equal(t, "adam8bit_step_")


def test_noncontiguous_grad_and_absmax(device):
    """g may be strided; absmax is updated in place even when it is a strided view."""
    group = [Tensors(randn_nonzero((600,), torch.float32, device), 256)]
    ours = [group[0].clone()]
    wide1 = torch.zeros(3, 2, device=device)
    ours[0].absmax1 = wide1[:, 0]  # a strided view into a larger tensor
    assert not ours[0].absmax1.is_contiguous()
    for _ in range(2):
        g = randn_nonzero((600,), torch.float32, device)
        multi_step("reference", group, [g])
        multi_step("triton", ours, [noncontiguous(g)])
        ours[0].assert_equal(group[0], "noncontiguous")
    assert torch.equal(wide1[:, 0], group[0].absmax1) and wide1[:, 1].eq(0).all()


# ---------------------------------------------------------------- float32 states


class FloatTensors(Tensors):
    """One parameter's arguments of ``adam_multi_step_`` (float32 m and v), from zero states."""

    NAMES = ("p", "m", "v", "step", "skipped")

    def __init__(self, p):
        self.p = p
        self.m = torch.zeros(p.shape, device=p.device)
        self.v = torch.zeros(p.shape, device=p.device)
        self.step = torch.zeros((), device=p.device)
        self.skipped = torch.zeros((), device=p.device)

    def clone(self):
        twin = object.__new__(FloatTensors)
        for name in self.NAMES:
            setattr(twin, name, getattr(self, name).clone())
        return twin


def float_state_step(backend, group, grads, lr=1e-2, wd=0.0, decoupled=True, gnorm=1.0):
    run_on(
        backend, torch.ops.lowprec.adam_multi_step_,
        [t.p for t in group], grads, [t.m for t in group], [t.v for t in group],
        [t.step for t in group], [t.skipped for t in group],
        lr, B1, B2, EPS, wd, decoupled, gnorm,
    )  # fmt: skip


def run_both_float_states(group, steps, **kwargs):
    return run_both(group, steps, op=float_state_step, **kwargs)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_states_equal_reference_step_by_step(device, dtype, decoupled):
    group = [FloatTensors(randn_nonzero(s, dtype, device)) for s in SHAPES]
    ours = run_both_float_states(group, steps=4, bad_step=2, wd=0.05, decoupled=decoupled,
                                 lr=3e-3)  # fmt: skip
    assert [t.step.item() for t in ours] == [4, 3, 4, 4, 4]
    assert [t.skipped.item() for t in ours] == [0, 1, 0, 0, 0]


def test_float_states_mixed_dtypes_gnorm_and_strided_grads(device):
    """Dtypes interleaved (each dtype's tensors are not adjacent in the call), two whole tiles,
    strided gradients, and the three weight-decay settings with a gradient scale."""
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    sizes = [300, 4096, 77, 2049, 5]
    group = [FloatTensors(randn_nonzero((n,), d, device)) for n, d in zip(sizes, dtypes)]
    run_both_float_states(group, steps=2, bad_step=1, wd=0.01, gnorm=0.37,
                          grad_of=noncontiguous)  # fmt: skip
    run_both_float_states(group, steps=1, wd=0.01, decoupled=False, gnorm=3.0)
    run_both_float_states(group, steps=1, wd=0.0, gnorm=0.5)


def test_float_states_shaped_unlike_p(device):
    """The op takes m and v of p's number of elements in any shape (as the reference does)."""
    group = [FloatTensors(randn_nonzero((3, 20), torch.float32, device)) for _ in range(2)]
    group[0].m, group[0].v = group[0].m.reshape(60), group[0].v.reshape(1, 60, 1)
    group[1].m = group[1].m.reshape(20, 3)
    run_both_float_states(group, steps=2, wd=0.01)


@pytest.mark.parametrize("states", ["8-bit", "float32"])
def test_every_gradient_non_finite(device, states):
    eight_bit = states == "8-bit"
    make, op = (
        ((lambda p: Tensors(p, 256)), multi_step) if eight_bit else (FloatTensors, float_state_step)
    )
    group = [make(randn_nonzero((500,), torch.float16, device)) for _ in range(2)]
    before = [t.clone() for t in group]
    grads = [torch.full((500,), float("nan"), dtype=torch.float16, device=device)] * 2
    op("triton", group, grads)
    for a, b in zip(group, before):
        b.skipped += 1
        a.assert_equal(b, "all skipped")


def test_float_states_fractional_step_count(device):
    group = [FloatTensors(randn_nonzero(s, torch.float32, device)) for s in [(300,), (77,)]]
    for t in group:
        t.step.fill_(2.5)
    ours = run_both_float_states(group, steps=2, wd=0.01)
    assert [t.step.item() for t in ours] == [4.0, 4.0]


def test_optimizer_float_states_take_the_triton_kernel(device, monkeypatch):
    """The optimizers' float32-state tensors take this kernel: by default on CUDA (which has
    no C++ kernel for them), when forced on the CPU."""
    if device == "cuda":
        assert _dispatch.kernel_for("adam_multi_step_", "cuda")[0] == "triton"
    assert_optimizer_float_states_take(monkeypatch, device, None if device == "cuda" else "triton")


# ---------------------------------------------------------------- the GPU code path

# Compiles the kernels for sm_90 as the launcher launches them and reports, per kernel,
# the PTX instructions that decide exactness and vectorization (conftest's
# run_sm90_compile_script supplies compile()).
_COMPILE_FOR_SM90 = r"""
import re
from lowprec_kernels.backends.triton import adam8bit as k

def ptx(fn, signature, constexprs, **options):
    return compile(fn, signature, constexprs, **options).asm["ptx"]

def ops(text):
    return sorted(set(re.findall(
        r"\b(?:(?:div|sqrt|rcp|rsqrt|fma|mad)\.[a-z0-9.]+|(?:ld|st)\.global[a-z0-9.]*|atom\.[a-z.]+)",
        text)))

pointers = ["update_scalars_ptr", "qmap1_ptr", "qmap2_ptr", "thresholds1_ptr", "thresholds2_ptr"]
scalars = ["beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay",
           "decay_factor", "gnorm_scale"]
table = {"table_ptr": "*i64", "program_tensor_ptr": "*i32", "nonfinite_ptr": "*i32"}
update = {**table, **{n: "*fp32" for n in pointers}, "n_tensors": "i32",
          **{n: "fp32" for n in scalars}}
report = {}
for name, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
    constexprs = dict(P_DTYPE=dtype, APPLY_L2=True, APPLY_DECAY=True, BLOCKSIZE=256,
                      BLOCKS_PER_PROGRAM=8, ALIGNED=True, CODEBOOK_BITS=k.CODEBOOK_BITS,
                      TINY_ABSMAX=k.TINY_ABSMAX, TINY_ABSMAX_SCALE=k.TINY_ABSMAX_SCALE)
    report["update_" + name] = ops(ptx(k._adam8bit_update_kernel, update, constexprs,
                                       enable_fp_fusion=False, num_warps=8))
float_state = {**table, "update_scalars_ptr": "*fp32", "n_tensors": "i32",
               **{n: "fp32" for n in scalars}}
# The launches' combinations: decoupled decay (AdamW) and L2 decay (Adam), never both.
for name, dtype, l2 in (("fp32", tl.float32, False), ("fp16", tl.float16, True)):
    report["float_state_" + name] = ops(ptx(
        k._adam_float_state_kernel, float_state,
        dict(P_DTYPE=dtype, APPLY_L2=l2, APPLY_DECAY=not l2, TILE=2048, ALIGNED=True),
        enable_fp_fusion=False, num_warps=8))
report["nonfinite"] = ops(ptx(k._find_nonfinite_kernel, {**table, "n_tensors": "i32"},
                              dict(G_DTYPE=tl.float16, TILE=2048, ALIGNED=True)))
report["count"] = ops(ptx(k._count_steps_kernel, {"table_ptr": "*i64", "nonfinite_ptr": "*i32",
                                                  "n_tensors": "i32"}, dict(TILE=k.COUNT_TILE)))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def sm90_code():
    return run_sm90_compile_script(_COMPILE_FOR_SM90)


@pytest.mark.parametrize("p_dtype", ["fp32", "bf16"])
def test_gpu_code_is_exact_and_vectorized(sm90_code, p_dtype):
    """IEEE division and square root that keep subnormals (div.rn.f32 / sqrt.rn.f32, no
    .ftz, no .approx), no fused multiply-add, and 128-bit accesses on the unmasked path."""
    ops = sm90_code[f"update_{p_dtype}"]
    float_ops = {op for op in ops if op.rsplit(".", 1)[-1] in ("f16", "bf16", "f32", "f64")}
    float_ops -= {op for op in ops if op.startswith(("ld.", "st.", "atom."))}
    assert float_ops == {"div.rn.f32", "sqrt.rn.f32"}, float_ops
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops


@pytest.mark.parametrize("p_dtype", ["fp32", "fp16"])
def test_gpu_code_of_the_float_state_kernel(sm90_code, p_dtype):
    """The same exactness as the 8-bit update, and vector accesses on the unmasked path."""
    ops = sm90_code["float_state_" + p_dtype]
    float_ops = {op for op in ops if op.rsplit(".", 1)[-1] in ("f16", "bf16", "f32", "f64")}
    float_ops -= {op for op in ops if op.startswith(("ld.", "st.", "atom."))}
    assert float_ops == {"div.rn.f32", "sqrt.rn.f32"}, float_ops
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops


def test_gpu_code_of_the_other_kernels(sm90_code):
    assert any(op.startswith("atom.global") for op in sm90_code["nonfinite"])
    assert "ld.global.v4.b32" in sm90_code["nonfinite"]
    assert any(op.startswith("st.global") for op in sm90_code["count"])

"""The fused 8-bit Adam / AdamW kernels against the reference, step by step.

Every native backend (``device_backend``) runs ``adam8bit_step_`` / ``adam8bit_multi_step_``
on copies of the same tensors as the ``reference`` backend, one step at a time from identical
inputs, and must reproduce its codes, block scales and counters exactly. Parameters must match
bit for bit on the CPU kernels (same float32 operations, no FMA). Elsewhere they may differ by
one unit in the last place of their dtype: torch's CUDA kernels divide by a Python scalar as a
multiplication by its reciprocal, which made the reference on a GPU itself off by an ulp when
its update divided by the bias corrections. The update no longer divides by a scalar (the
corrections are folded into ``update_scalars``), so GPU parameters may now match exactly; the
allowance stays until a GPU run shows that.

The CPU kernels also run on every instruction-set path (``cpu_isa``), and their arithmetic
state encoder (lowprec/adam8bit.h) is compared with the exact threshold search on every float
of [-1, 1] (the default path; every path with LOWPREC_EXHAUSTIVE=1) and, on every path, on
sampled floats and every threshold's neighbours.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import SUPPORTED_CPU_ISAS, assert_optimizer_float_states_take, run_on

import lowprec_kernels as lpk
from lowprec_kernels import _dispatch
from lowprec_kernels.reference.codebooks import dynamic_map, encode_nearest, encode_thresholds

ops = torch.ops.lowprec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f16", "bf16")

# (decoupled, weight_decay, gnorm_scale): AdamW with decay, Adam with decay added to the
# gradient, no decay with a gradient scale that is not a power of two, and both (the decay is
# added after the scaling, which only that combination tells apart).
VARIANTS = [(True, 0.01, 1.0), (False, 0.1, 1.0), (True, 0.0, 0.37), (False, 0.1, 0.37)]
VARIANT_IDS = ["adamw", "adam-wd", "gnorm", "adam-wd-gnorm"]
LR, BETA1, BETA2, EPS = 1e-2, 0.9, 0.999, 1e-8


def randn_nonzero(shape, dtype, device, scale=1.0):
    x = torch.randn(shape, device=device) * scale
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


class State:
    """One parameter's tensors for the op, in the op's argument order."""

    NAMES = ("p", "state1", "state2", "absmax1", "absmax2", "step", "skipped")

    def __init__(self, p, blocksize, fresh=False):
        n = p.numel()
        nb = -(-n // blocksize)
        device = p.device
        self.p = p
        if fresh:  # bitsandbytes' initial state: zero codes and scales
            self.state1 = torch.zeros(p.shape, dtype=torch.uint8, device=device)
            self.state2 = torch.zeros(p.shape, dtype=torch.uint8, device=device)
            self.absmax1 = torch.zeros(nb, device=device)
            self.absmax2 = torch.zeros(nb, device=device)
            self.step = torch.zeros((), device=device)
        else:  # a state in mid-training: every code and a spread of scales
            self.state1 = torch.randint(0, 256, p.shape, dtype=torch.uint8, device=device)
            self.state2 = torch.randint(0, 256, p.shape, dtype=torch.uint8, device=device)
            self.absmax1 = torch.rand(nb, device=device) * 0.1 + 1e-4
            self.absmax2 = torch.rand(nb, device=device) * 1e-3 + 1e-7
            self.step = torch.tensor(7.0, device=device)
        self.skipped = torch.zeros((), device=device)

    def tensors(self):
        return [getattr(self, name) for name in self.NAMES]

    def clone(self):
        other = object.__new__(State)
        for name in self.NAMES:
            setattr(other, name, getattr(self, name).clone())
        return other


def step_args(st, g, qmap1, qmap2, variant, blocksize):
    decoupled, weight_decay, gnorm_scale = variant
    return (
        st.p, g, st.state1, st.state2, st.absmax1, st.absmax2, qmap1, qmap2, st.step,
        st.skipped, LR, BETA1, BETA2, EPS, weight_decay, decoupled, gnorm_scale, blocksize,
    )  # fmt: skip


def multi_step_args(states, grads, qmap1, qmap2, variant, blocksize):
    decoupled, weight_decay, gnorm_scale = variant
    lists = [[getattr(st, name) for st in states] for name in State.NAMES]
    p, s1, s2, a1, a2, steps, skipped = lists
    return (
        p, list(grads), s1, s2, a1, a2, qmap1, qmap2, steps, skipped,
        LR, BETA1, BETA2, EPS, weight_decay, decoupled, gnorm_scale, blocksize,
    )  # fmt: skip


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (float64)."""
    big = torch.finfo(x.dtype).max
    x = x.abs()
    return (torch.nextafter(x, torch.full_like(x, big)) - x).double()


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def differing(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Where two float tensors differ bit for bit (any NaN equals any NaN)."""
    same = got.view(_BITS[got.dtype]) == want.view(_BITS[want.dtype])
    return ~(same | (got.isnan() & want.isnan()))


def assert_state_matches(kernel: State, ref: State, backend: str, what: str = ""):
    for name in ("state1", "state2"):
        got, want = getattr(kernel, name), getattr(ref, name)
        assert torch.equal(got, want), f"{what}{name}: {(got != want).sum().item()} codes differ"
    for name in ("absmax1", "absmax2", "step", "skipped"):
        bad = differing(getattr(kernel, name), getattr(ref, name))
        assert not bad.any(), f"{what}{name}: {bad.sum().item()} differ"
    if backend == "cpu":
        bad = differing(kernel.p, ref.p)
        assert not bad.any(), f"{what}p: {bad.sum().item()} differ"
    else:  # see the module docstring: one ulp of p's dtype
        err = (kernel.p.double() - ref.p.double()).abs()
        same = (kernel.p == ref.p) | (kernel.p.isnan() & ref.p.isnan())  # infinities too
        ok = same | (err <= ulp(ref.p))
        assert bool(ok.all()), f"{what}p: max error {err.max().item():.3g}"


def run_both(op_name, backend, kernel_args, ref_args):
    op = getattr(ops, op_name)
    run_on(backend, op, *kernel_args)
    run_on("reference", op, *ref_args)


def step_both_and_compare(backend, ref, g, qmap1, qmap2, variant, blocksize):
    """One adam8bit_step_ of a copy of ``ref`` on ``backend`` and of ``ref`` on the reference,
    compared."""
    kernel = ref.clone()
    run_both(
        "adam8bit_step_",
        backend,
        step_args(kernel, g, qmap1, qmap2, variant, blocksize),
        step_args(ref, g, qmap1, qmap2, variant, blocksize),
    )
    assert_state_matches(kernel, ref, backend)


# ---------------------------------------------------------------- one tensor, several steps

SIZES = [1, 63, 300, 4099]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_steps_match_reference(device_backend, dtype, n, blocksize, variant):
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    ref = State(randn_nonzero(n, dtype, device), blocksize, fresh=(n % 2 == 1))
    for t in range(3):
        kernel = ref.clone()
        g = randn_nonzero(n, dtype, device, scale=0.1)
        run_both(
            "adam8bit_step_",
            backend,
            step_args(kernel, g, qmap1, qmap2, variant, blocksize),
            step_args(ref, g, qmap1, qmap2, variant, blocksize),
        )
        assert_state_matches(kernel, ref, backend, f"step {t}: ")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_largest_blocksize_and_shapes(device_backend, dtype):
    """blocksize 4096 with a partial last block, and a parameter with leading dimensions."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    for shape, blocksize in (((2 * 4096 + 17,), 4096), ((3, 5, 37), 128)):
        ref = State(randn_nonzero(shape, dtype, device), blocksize)
        kernel = ref.clone()
        g = randn_nonzero(shape, dtype, device)
        run_both(
            "adam8bit_step_",
            backend,
            step_args(kernel, g, qmap1, qmap2, VARIANTS[0], blocksize),
            step_args(ref, g, qmap1, qmap2, VARIANTS[0], blocksize),
        )
        assert_state_matches(kernel, ref, backend, f"{shape}: ")


def test_extreme_blocks(device_backend):
    """All-zero blocks (absmax 0), a gradient whose square term overflows (v = inf: absmax inf,
    the block's codes from NaN and 0 quotients), values around the map's smallest entries, a
    subnormal absmax."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    n, blocksize = 64 * 6, 64
    ref = State(randn_nonzero(n, torch.float32, device), blocksize, fresh=True)
    g = randn_nonzero(n, torch.float32, device)
    g[:64] = 0.0  # block 0: m = v = 0
    g[64:128] *= 1e-30  # block 1: tiny gradients, v underflows to subnormals or zero
    g[130] = 1e21  # block 2: (1 - beta2) * g * g overflows to inf
    g[140] = 3e19  # (g * g alone would overflow here: the order keeps v finite)
    g[192:256] = torch.linspace(-1e-6, 1e-6, 64, device=device)  # block 3: near the map's zero
    g[256:320] = 1e-7 * torch.sign(g[256:320])  # block 4: equal magnitudes
    g[320:384] *= 1e-40  # block 5: m's absmax subnormal (no finite reciprocal), v = 0
    for t in range(2):
        kernel = ref.clone()
        run_both(
            "adam8bit_step_",
            backend,
            step_args(kernel, g, qmap1, qmap2, VARIANTS[0], blocksize),
            step_args(ref, g, qmap1, qmap2, VARIANTS[0], blocksize),
        )
        assert_state_matches(kernel, ref, backend, f"step {t}: ")
    assert ref.absmax1[0] == 0 and not torch.isfinite(ref.absmax2[2])
    assert 0 < ref.absmax1[5] < torch.finfo(torch.float32).tiny


def test_other_codebooks(device_backend):
    """Maps that are not the dynamic maps (the fast encoder does not apply) still encode by
    the exact rule: a uniform map and a sorted random one."""
    device, backend = device_backend
    uniform = torch.linspace(-1, 1, 256, device=device)
    scattered = torch.sort(torch.rand(256, device=device) * 2 - 1).values
    scattered[-1] = 1.0
    for qmap1, qmap2 in ((uniform, uniform.abs().sort().values), (scattered, scattered)):
        ref = State(randn_nonzero(777, torch.float32, device), 256)
        g = randn_nonzero(777, torch.float32, device)
        step_both_and_compare(backend, ref, g, qmap1, qmap2, VARIANTS[1], 256)


def test_signed_second_moment_map(device_backend):
    """The raw op with a signed map for the second moment (a dynamic map the fast encoder
    fits): codes that decode to negative v, so that some new v stay negative, must still
    encode by the exact rule."""
    device, backend = device_backend
    qmap = dynamic_map(True, device)
    ref = State(randn_nonzero(1000, torch.float32, device), 256)
    ref.state2 = torch.randint(0, 100, (1000,), dtype=torch.uint8, device=device)  # v < 0
    g = randn_nonzero(1000, torch.float32, device, scale=1e-3)
    step_both_and_compare(backend, ref, g, qmap, qmap, VARIANTS[0], 256)
    assert (ref.state2 < 127).any(), "no v stayed negative: the test lost its point"


def test_absmax_near_the_float32_maximum(device_backend):
    """Blocks whose new absmax exceeds 2^126 (its reciprocal is subnormal, less precise than
    the fast encoder's margins assume) still encode by the exact rule."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    ref = State(randn_nonzero(512, torch.float32, device), 256)
    ref.absmax1.fill_(3e38)  # m = code * 3e38: the new absmax stays near 3e38 (beta1 = 0.9)
    ref.absmax2.fill_(1e-7)
    g = randn_nonzero(512, torch.float32, device, scale=1e-3)
    step_both_and_compare(backend, ref, g, qmap1, qmap2, VARIANTS[1], 256)
    assert (ref.absmax1 > 2.0**126).all()


def test_noncontiguous_inputs(device_backend):
    """A strided gradient, and scales / counters that are views (updated in place)."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    n, blocksize = 1000, 64
    ref = State(randn_nonzero(n, torch.float32, device), blocksize)
    kernel = ref.clone()
    nb = ref.absmax1.numel()
    wide = torch.zeros(nb, 4, device=device)
    wide[:, 1], wide[:, 3] = kernel.absmax1, kernel.absmax2
    kernel.absmax1, kernel.absmax2 = wide[:, 1], wide[:, 3]
    g = randn_nonzero((n, 2), torch.float32, device)[:, 0]
    assert not (g.is_contiguous() or kernel.absmax1.is_contiguous())
    run_both(
        "adam8bit_step_",
        backend,
        step_args(kernel, g, qmap1, qmap2, VARIANTS[0], blocksize),
        step_args(ref, g, qmap1, qmap2, VARIANTS[0], blocksize),
    )
    assert_state_matches(kernel, ref, backend)
    assert torch.equal(wide[:, 1], ref.absmax1) and torch.equal(wide[:, 3], ref.absmax2)


# ---------------------------------------------------------------- many tensors, one call


def test_multi_step_mixed_tensors(device_backend):
    """One call over tensors of every dtype and odd sizes equals one reference step each."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    blocksize = 64
    specs = [(1, torch.float32), (333, torch.bfloat16), (64, torch.float16), (4100, torch.float32)]
    refs = [State(randn_nonzero(n, dt, device), blocksize, fresh=i == 0) for i, (n, dt) in
            enumerate(specs)]  # fmt: skip
    for t in range(2):
        kernels = [st.clone() for st in refs]
        grads = [randn_nonzero(n, dt, device) for n, dt in specs]
        run_both(
            "adam8bit_multi_step_",
            backend,
            multi_step_args(kernels, grads, qmap1, qmap2, VARIANTS[1], blocksize),
            multi_step_args(refs, grads, qmap1, qmap2, VARIANTS[1], blocksize),
        )
        for i, (kernel, ref) in enumerate(zip(kernels, refs)):
            assert_state_matches(kernel, ref, backend, f"step {t}, tensor {i}: ")


def test_multi_step_many_tensors(device_backend):
    """More tensors than one CUDA launch group holds (32), of different step counts."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    refs = [State(randn_nonzero(17 + 13 * i, torch.float32, device), 64) for i in range(40)]
    for i, st in enumerate(refs):
        st.step.fill_(i)
    kernels = [st.clone() for st in refs]
    grads = [randn_nonzero(st.p.numel(), torch.float32, device) for st in refs]
    run_both(
        "adam8bit_multi_step_",
        backend,
        multi_step_args(kernels, grads, qmap1, qmap2, VARIANTS[0], 64),
        multi_step_args(refs, grads, qmap1, qmap2, VARIANTS[0], 64),
    )
    for i, (kernel, ref) in enumerate(zip(kernels, refs)):
        assert_state_matches(kernel, ref, backend, f"tensor {i}: ")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_non_finite_gradients_skip_only_their_tensor(device_backend, dtype):
    """NaN in one tensor, +inf and -inf in another: those two are left untouched and counted,
    the finite ones are updated, in the same call."""
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    sizes = [500, 300, 4100, 70]
    refs = [State(randn_nonzero(n, dtype, device), 64) for n in sizes]
    grads = [randn_nonzero(n, dtype, device) for n in sizes]
    grads[1][123] = float("nan")
    grads[2][0] = float("inf")
    grads[2][4099] = float("-inf")
    before = [st.clone() for st in refs]
    kernels = [st.clone() for st in refs]
    run_both(
        "adam8bit_multi_step_",
        backend,
        multi_step_args(kernels, grads, qmap1, qmap2, VARIANTS[0], 64),
        multi_step_args(refs, grads, qmap1, qmap2, VARIANTS[0], 64),
    )
    for i, (kernel, ref, old) in enumerate(zip(kernels, refs, before)):
        assert_state_matches(kernel, ref, backend, f"tensor {i}: ")
        skipped = i in (1, 2)
        assert kernel.skipped.item() == (1.0 if skipped else 0.0)
        assert kernel.step.item() == old.step.item() + (0 if skipped else 1)
        unchanged = all(torch.equal(getattr(kernel, name), getattr(old, name))
                        for name in ("p", "state1", "state2", "absmax1", "absmax2"))  # fmt: skip
        assert unchanged == skipped, f"tensor {i}"


def test_single_step_skip(device_backend):
    device, backend = device_backend
    qmap1, qmap2 = dynamic_map(True, device), dynamic_map(False, device)
    st = State(randn_nonzero(300, torch.bfloat16, device), 64)
    before = st.clone()
    g = randn_nonzero(300, torch.bfloat16, device)
    g[-1] = float("nan")
    for _ in range(2):
        run_on(backend, ops.adam8bit_step_, *step_args(st, g, qmap1, qmap2, VARIANTS[0], 64))
    for name in ("p", "state1", "state2", "absmax1", "absmax2", "step"):
        assert torch.equal(getattr(st, name), getattr(before, name)), name
    assert st.skipped.item() == 2


# ---------------------------------------------------------------- CPU: every ISA path

_C = getattr(lpk, "_C", None)
NATIVE_CPU = _C is not None and lpk.available_backends()["cpu"]
needs_native_cpu = pytest.mark.skipif(not NATIVE_CPU, reason="native CPU kernels not built")


@needs_native_cpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_cpu_isa_paths_match_reference(cpu_isa, dtype, variant):
    qmap1, qmap2 = dynamic_map(True), dynamic_map(False)
    specs = [(5, 64), (1000, 64), (5000, 256), (9000, 4096)]
    refs = [State(randn_nonzero(n, dtype, "cpu"), bs) for n, bs in specs]
    for t in range(2):
        for (n, blocksize), ref in zip(specs, refs):
            kernel = ref.clone()
            g = randn_nonzero(n, dtype, "cpu")
            run_both(
                "adam8bit_step_",
                "cpu",
                step_args(kernel, g, qmap1, qmap2, variant, blocksize),
                step_args(ref, g, qmap1, qmap2, variant, blocksize),
            )
            assert_state_matches(kernel, ref, "cpu", f"{cpu_isa} n={n} step {t}: ")


@needs_native_cpu
@pytest.mark.parametrize("case", ["mirrors", "last-code-unlike-center", "one-ulp-off"])
def test_cpu_first_moment_map_mirror_decode(cpu_isa, case):
    """The AVX-512 path decodes a first-moment map that mirrors around code 127 (code 254 - c
    = -code c, as the signed dynamic map does) from its 128 magnitudes, the last code apart;
    a map that mirrors all but bit for bit takes the full tables. Both decode every code (the
    state holds all 256) as the reference does."""
    gen = torch.Generator().manual_seed(5)
    magnitudes = torch.sort(torch.rand(127, generator=gen) * 0.99 + 1e-3).values
    qmap1 = torch.cat([-magnitudes.flip(0), torch.zeros(1), magnitudes, torch.ones(1)])
    if case == "last-code-unlike-center":  # the lookup takes only its upper two bytes
        qmap1[255] = 0.9999  # 0x3f7ff972
    elif case == "one-ulp-off":
        qmap1[3] = torch.nextafter(qmap1[3], torch.tensor(0.0))
    for blocksize in (64, 256):
        ref = State(randn_nonzero(1000, torch.float32, "cpu"), blocksize)
        g = randn_nonzero(1000, torch.float32, "cpu")
        step_both_and_compare("cpu", ref, g, qmap1, dynamic_map(False), VARIANTS[0], blocksize)


@needs_native_cpu
def test_cpu_isa_paths_signed_second_moment_map(cpu_isa):
    """test_signed_second_moment_map on every CPU path, with blocks whose new v are all >= +0
    (which the SIMD paths encode without the sign) beside blocks with negative ones, and a
    block tail that is no whole vector."""
    qmap = dynamic_map(True)
    ref = State(randn_nonzero(1003, torch.float32, "cpu"), 256)
    ref.state2[:512] = torch.randint(0, 100, (512,), dtype=torch.uint8)  # v < 0
    ref.state2[512:] = torch.randint(128, 256, (491,), dtype=torch.uint8)  # v > 0
    g = randn_nonzero(1003, torch.float32, "cpu", scale=1e-3)
    step_both_and_compare("cpu", ref, g, qmap, qmap, VARIANTS[0], 256)
    assert (ref.state2[:512] < 127).any() and (ref.state2[512:] > 127).all()


@needs_native_cpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_cpu_isa_paths_skip_non_finite(cpu_isa, dtype):
    qmap1, qmap2 = dynamic_map(True), dynamic_map(False)
    sizes = [40000, 100, 3000]  # the first spans several finiteness chunks
    refs = [State(randn_nonzero(n, dtype, "cpu"), 256) for n in sizes]
    grads = [randn_nonzero(n, dtype, "cpu") for n in sizes]
    grads[0][-1] = float("inf")  # in the last chunk, the vector tail
    grads[2][1000] = float("nan")
    kernels = [st.clone() for st in refs]
    run_both(
        "adam8bit_multi_step_",
        "cpu",
        multi_step_args(kernels, grads, qmap1, qmap2, VARIANTS[0], 256),
        multi_step_args(refs, grads, qmap1, qmap2, VARIANTS[0], 256),
    )
    for kernel, ref in zip(kernels, refs):
        assert_state_matches(kernel, ref, "cpu", f"{cpu_isa}: ")
    assert [k.skipped.item() for k in kernels] == [1.0, 0.0, 1.0]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """The CPU kernels on one thread and on two (their parallel region's two schedules)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_native_cpu
@pytest.mark.parametrize(
    "sizes, bad",
    [([2_200_000, 2_200_000, 1000], 1), ([1000, 2_100_000, 700_000, 2_300_000, 5, 1_900_000], 3)],
    ids=["three", "mixed"],
)
def test_cpu_gradient_batches(torch_threads, sizes, bad):
    """Gradients larger than one finiteness batch (8 MiB), in one call: each batch is checked,
    then updated, on one thread and on two; a non-finite value in a later batch skips only its
    tensor."""
    qmap1, qmap2 = dynamic_map(True), dynamic_map(False)
    refs = [State(randn_nonzero(n, torch.float32, "cpu"), 256) for n in sizes]
    grads = [randn_nonzero(n, torch.float32, "cpu") for n in sizes]
    grads[bad][-3] = float("-inf")
    kernels = [st.clone() for st in refs]
    run_both(
        "adam8bit_multi_step_",
        "cpu",
        multi_step_args(kernels, grads, qmap1, qmap2, VARIANTS[0], 256),
        multi_step_args(refs, grads, qmap1, qmap2, VARIANTS[0], 256),
    )
    for kernel, ref in zip(kernels, refs):
        assert_state_matches(kernel, ref, "cpu")
    assert [k.skipped.item() for k in kernels] == [float(i == bad) for i in range(len(sizes))]


# The CPU finiteness check's chunk for a tensor of CHUNK_TEST_ELEMENTS elements on one or two
# threads (step_tensors: at least kMinCheckChunkElements).
CHECK_CHUNK = 65536
CHUNK_TEST_ELEMENTS = 3 * CHECK_CHUNK


@needs_native_cpu
@pytest.mark.parametrize("states", ["8bit", "float32"])
@pytest.mark.parametrize("where", [CHECK_CHUNK - 1, CHECK_CHUNK, 2 * CHECK_CHUNK - 1])
def test_cpu_non_finite_on_a_check_chunk_boundary(torch_threads, states, where):
    """A NaN on the last or first element of a finiteness chunk skips its tensor (the other
    tests' values sit inside chunks or at the tensor's end)."""
    n = CHUNK_TEST_ELEMENTS
    g = randn_nonzero(n, torch.float32, "cpu")
    g[where] = float("nan")
    if states == "8bit":
        qmap1, qmap2 = dynamic_map(True), dynamic_map(False)
        kernel = State(randn_nonzero(n, torch.float32, "cpu"), 256)
        before = kernel.clone()
        run_on("cpu", ops.adam8bit_multi_step_,
               *multi_step_args([kernel], [g], qmap1, qmap2, VARIANTS[0], 256))  # fmt: skip
        for name in State.NAMES[:-1]:
            assert torch.equal(getattr(kernel, name), getattr(before, name)), name
        assert kernel.skipped.item() == 1.0
    else:
        kernel = float_state(n, torch.float32)
        before = [x.clone() for x in kernel]
        run_on("cpu", ops.adam_multi_step_, *float_state_args([kernel], [g], VARIANTS[0]))
        assert all(torch.equal(a, b) for a, b in zip(kernel[:4], before[:4]))
        assert kernel[4].item() == 1.0


# ---------------------------------------------------- CPU: float32 states (adam_multi_step_)


def float_state(n, dtype):
    """One parameter's tensors for adam_multi_step_: p, m, v, step, skipped."""
    return [
        randn_nonzero(n, dtype, "cpu"), torch.randn(n) * 0.1, torch.rand(n) * 0.01,
        torch.tensor(4.0), torch.tensor(0.0),
    ]  # fmt: skip


def float_state_args(states, grads, variant):
    decoupled, weight_decay, gnorm_scale = variant
    p, m, v, step, skipped = (list(t) for t in zip(*states))
    return (p, grads, m, v, step, skipped, LR, BETA1, BETA2, EPS, weight_decay, decoupled,
            gnorm_scale)  # fmt: skip


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


FLOAT_STATE_NAMES = ("p", "exp_avg", "exp_avg_sq", "step", "skipped")


@needs_native_cpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_float_states_match_reference(cpu_isa, dtype, variant):
    """The float32-state step, bit for bit: odd sizes (vector tails), a tensor spanning several
    finiteness chunks, update units and both threads; in the second step a NaN and an infinity
    skip exactly their tensors, which stay as they were."""
    sizes = [1, 15, 17, 1000, 4097, 300_001]
    refs = [float_state(n, dtype) for n in sizes]
    for t in range(2):
        grads = [randn_nonzero(n, dtype, "cpu") for n in sizes]
        if t == 1:
            grads[1][3] = float("nan")
            grads[5][-1] = float("inf")  # in the last chunk, the vector tail
        kernels = [[x.clone() for x in st] for st in refs]
        before = [[x.clone() for x in st] for st in refs]
        run_on("cpu", ops.adam_multi_step_, *float_state_args(kernels, grads, variant))
        run_on("reference", ops.adam_multi_step_, *float_state_args(refs, grads, variant))
        for n, kernel, ref, old in zip(sizes, kernels, refs, before):
            for name, got, want in zip(FLOAT_STATE_NAMES, kernel, ref):
                assert torch.equal(bits(got), bits(want)), f"{cpu_isa} n={n} step {t}: {name}"
            if t == 1 and n in (15, 300_001):
                assert all(torch.equal(a, b) for a, b in zip(kernel[:4], old[:4])), f"n={n}"
    assert [st[4].item() for st in refs] == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert [st[3].item() for st in refs] == [6.0, 5.0, 6.0, 6.0, 6.0, 5.0]


@needs_native_cpu
def test_states_shaped_unlike_p():
    """The ops need only p's number of elements in each state (memory order), as both kernels
    and the reference read them: a [3, 4] p with flat states."""
    p, g = randn_nonzero((3, 4), torch.float32, "cpu"), randn_nonzero((3, 4), torch.float32, "cpu")
    flat = float_state(12, torch.float32)
    got, want = [[t.clone() for t in (p, *flat[1:])] for _ in range(2)]
    run_on("cpu", ops.adam_multi_step_, *float_state_args([got], [g], VARIANTS[1]))
    run_on("reference", ops.adam_multi_step_, *float_state_args([want], [g], VARIANTS[1]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    qmap1, qmap2 = dynamic_map(True), dynamic_map(False)
    ref = State(p.clone(), 64)
    ref.state1, ref.state2 = ref.state1.reshape(-1), ref.state2.reshape(-1)
    kernel = ref.clone()
    run_both(
        "adam8bit_step_", "cpu", step_args(kernel, g, qmap1, qmap2, VARIANTS[0], 64),
        step_args(ref, g, qmap1, qmap2, VARIANTS[0], 64),
    )  # fmt: skip
    assert_state_matches(kernel, ref, "cpu")


@needs_native_cpu
def test_optimizer_float_states_take_the_kernel(monkeypatch):
    """The CPU's kernel steps the optimizers' float32-state tensors, by default."""
    assert _dispatch.kernel_for("adam_multi_step_", "cpu")[0] == "cpu"
    assert_optimizer_float_states_take(monkeypatch, "cpu", None)


@needs_native_cpu
def test_float_state_paths_read_a_fractional_step_alike():
    """A step count of 2.5 (a state dict may hold one) is read as int(step) + 1 = 3 by the
    kernel and by the optimizers' tensor-op path alike, and both store 3."""
    p = torch.nn.Parameter(torch.randn(100))
    q = torch.nn.Parameter(p.detach().clone())
    fused, plain = lpk.optim.AdamW8bit([p]), lpk.optim.AdamW8bit([q])
    g = torch.randn(100)
    for opt, x in ((fused, p), (plain, q)):
        x.grad = g.clone()
        opt.step()
        opt.state[x]["step"].fill_(2.5)
    fused.step()
    with lpk.use_backend("reference"):
        plain.step()
    assert fused.state[p]["step"].item() == plain.state[q]["step"].item() == 3.0
    assert torch.equal(p, q)


# ---------------------------------------------------------------- CPU: the state encoder


@needs_native_cpu
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_segmented_encoder_applies_to_the_dynamic_maps(signed):
    assert _C.adam8bit_segmented_encoder_usable(dynamic_map(signed))
    # Scattered entries (no evenly spaced runs) and duplicated ones: the binary search alone.
    assert not _C.adam8bit_segmented_encoder_usable(torch.sort(torch.rand(256)).values)
    assert not _C.adam8bit_segmented_encoder_usable(torch.linspace(-1, 1, 256).abs().sort().values)


@needs_native_cpu
@pytest.mark.parametrize("absmax", [1.0, 0.3, 7.77e-4, 3.1e-30], ids=lambda a: f"absmax{a:g}")
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_encoder_sweep_matches_exact_rule(cpu_isa, signed, absmax):
    """Every 997th float v of [-1, 1] (about 2 million, all binades) and the 256 floats on each
    side of every threshold, encoded as x = v * absmax: the arithmetic encoder (which multiplies
    by 1 / absmax on AVX-512 and AVX2) agrees with the threshold search on x / absmax."""
    checked, mismatches, first_bad = _C.adam8bit_encoder_sweep_cpu(
        dynamic_map(signed), 997, 256, absmax
    )
    assert checked > 2_000_000
    assert mismatches == 0, f"{mismatches} mismatches, first at bits {first_bad:#010x}"


def _two_run_map(boundary: float, gap: float) -> torch.Tensor | None:
    """An unsigned map of two evenly spaced runs of 128, [0, a] and [b, 1] with a ~ boundary -
    gap / 2, whose threshold between them is ``boundary``; None if no float b gives that."""
    a = torch.tensor(boundary - gap / 2, dtype=torch.float32)
    b0 = torch.tensor(2 * boundary - a.item(), dtype=torch.float32)
    for b in (b0, torch.nextafter(b0, b0 + 1), torch.nextafter(b0, b0 - 1)):
        # Runs stepped in float32 (numpy's linspace to a float32 end): stepped in float64, a
        # few entries round the other way, enough to leave most maps to the exact search.
        ends = np.float32(a.item()), np.float32(b.item())
        runs = [np.linspace(0, ends[0], 128, dtype=np.float64), np.linspace(ends[1], 1, 128)]
        code = torch.from_numpy(np.concatenate(runs).astype(np.float32))
        if encode_thresholds(code)[127].item() == boundary:
            return code
    return None


@needs_native_cpu
@pytest.mark.parametrize("edge", [0.5, 0.125])
def test_encoder_boundary_near_a_key_edge(cpu_isa, edge):
    """A boundary between two runs within 40 units in the last place of a key's edge (the
    encoders' keys are pairs of binades): the encoder that takes the map (the AVX-512 and AVX2
    ones multiply by 1 / absmax, so values cross the boundary) still matches the exact rule on the
    boundary's neighbours. One unit below the edge once escaped every key's near window."""
    edge_bits = torch.tensor(edge, dtype=torch.float32).view(torch.int32).item()
    tested, usable = [], []
    for units in [*range(-40, 41, 3), -2, -1, 0, 1]:
        boundary = torch.tensor(edge_bits + units, dtype=torch.int32).view(torch.float32).item()
        code = _two_run_map(boundary, 2.0**-11 * edge)
        if code is None:
            continue
        tested.append(units)
        usable.append(_C.adam8bit_segmented_encoder_usable(code))
        for absmax in (1.0, 0.3, 3.1e-30):
            _, mismatches, first_bad = _C.adam8bit_encoder_sweep_cpu(code, 99991, 64, absmax)
            assert mismatches == 0, (
                f"{units} units from {edge}, absmax {absmax}: {mismatches} mismatches, "
                f"first at bits {first_bad:#010x}"
            )
    assert {-2, -1, 0, 1} <= set(tested) and len(tested) > 20
    assert sum(usable) >= 3  # some take the arithmetic encoder (the others are left to the search)


# Every float of [-1, 1] (2.1e9 values, a few seconds per map on the AVX-512 path): on the path
# the kernels take by default, and on every path with LOWPREC_EXHAUSTIVE=1.
EXHAUSTIVE_ISAS = SUPPORTED_CPU_ISAS if os.environ.get("LOWPREC_EXHAUSTIVE") == "1" else (
    SUPPORTED_CPU_ISAS[-1:])  # fmt: skip


@needs_native_cpu
@pytest.mark.parametrize("isa", EXHAUSTIVE_ISAS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_encoder_exhaustive(isa, signed):
    previous = _C.get_cpu_isa()
    _C.set_cpu_isa(isa)
    try:
        checked, mismatches, first_bad = _C.adam8bit_encoder_sweep_cpu(dynamic_map(signed), 1, 4096)
    finally:
        _C.set_cpu_isa(previous)
    assert checked > 2_132_000_000
    assert mismatches == 0, f"{mismatches} mismatches, first at bits {first_bad:#010x}"


@needs_native_cpu
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_encoder_special_values(cpu_isa, signed):
    """Against the reference rule: the ends of the range, zeros, subnormals, the map's entries
    and thresholds themselves, and random values in every decade. (NaN never reaches the
    encoder: a block holding one has a NaN absmax and is encoded by the exact search, see
    test_extreme_blocks.)"""
    code = dynamic_map(signed)
    thresholds = encode_thresholds(code)[:-1]
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor([1.0, -1.0, 0.0, -0.0, tiny, -tiny, tiny / 8, 2.0**-31])
    decades = torch.rand(20000) * 10.0 ** -torch.randint(0, 9, (20000,)).float()
    values = torch.cat([special, code, -code, thresholds, decades, -decades])
    out = torch.empty(values.shape, dtype=torch.uint8)
    _C.adam8bit_encode_cpu(values, code, out)
    want = encode_nearest(values, encode_thresholds(code)).to(torch.uint8)
    assert torch.equal(out, want), f"{(out != want).sum().item()} codes differ"

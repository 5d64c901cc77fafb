"""The codebooks and the nearest-code rule, pinned by golden hashes and hand-worked cases."""

import hashlib

import pytest
import torch

import lowprec_kernels as lpk
from lowprec_kernels import _tables
from lowprec_kernels import functional as LF
from lowprec_kernels.reference import codebooks


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_dynamic_map_signed_golden():
    m = LF.dynamic_map(signed=True)
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert sha256(m) == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    assert m[0].item() == pytest.approx(-0.992968738079071, abs=0)
    assert m[-1].item() == 1.0
    assert m.abs()[m != 0].min().item() == pytest.approx(5.5e-7, rel=1e-6)
    assert bool((m[1:] > m[:-1]).all()), "sorted ascending, no duplicates"


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_first_built_in_a_device_context(signed):
    """The CPU table is cached: built first inside torch.device("meta") (a model built on the
    meta device), it must still be built on the CPU, and the device asked for honoured."""
    codebooks._dynamic_map_cpu.cache_clear()
    _tables._cached_codebook.cache_clear()
    try:
        with torch.device("meta"):
            on_meta = LF.dynamic_map(signed)
        assert on_meta.is_meta
        table = LF.dynamic_map(signed)
        assert table.device.type == "cpu" and torch.equal(table, LF.dynamic_map(signed, "cpu"))
    finally:  # leave no table built here behind
        codebooks._dynamic_map_cpu.cache_clear()
        _tables._cached_codebook.cache_clear()
    assert torch.equal(table, LF.dynamic_map(signed))


def test_dynamic_map_unsigned_golden():
    m = LF.dynamic_map(signed=False)
    assert sha256(m) == "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"
    assert m.min().item() == 0.0 and m[-1].item() == 1.0


def test_dynamic_map_is_a_fresh_tensor():
    a = LF.dynamic_map()
    a.fill_(0)
    assert LF.dynamic_map()[-1].item() == 1.0


def test_nf4_golden():
    assert (
        sha256(codebooks.nf4_code())
        == "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
    )


def test_fp4_golden():
    code = codebooks.fp4_code()
    assert sha256(code) == "b830bcf8857895e5676b8e2ce608a60bb8af9b3ce6270073e9de34814196f09c"
    expected = [0, 1 / 192, 2 / 3, 1, 1 / 3, 1 / 2, 1 / 6, 1 / 4]
    torch.testing.assert_close(code[:8], torch.tensor(expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(code[8:], -code[:8])


def test_thresholds_are_exact_midpoints_rounded_down():
    code = LF.dynamic_map()
    t = codebooks.encode_thresholds(code)
    assert t.shape == (256,) and t[-1].item() == float("inf")
    mid = (code[:-1].double() + code[1:].double()) / 2
    assert bool((t[:-1].double() <= mid).all())
    # The next float32 above each threshold is already above the midpoint.
    above = torch.nextafter(t[:-1], torch.tensor(float("inf")))
    assert bool((above.double() > mid).all())


def test_encode_nearest_hand_cases():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    t = codebooks.encode_thresholds(code)
    v = torch.tensor([-1.0, -0.5, -0.4999, 0.25, 0.2501, 0.75, 0.7501, 1.0, float("nan")])
    # -0.5 and 0.25 and 0.75 are exact midpoints: ties go to the lower index.
    assert codebooks.encode_nearest(v, t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]


def test_encode_nearest_matches_argmin_on_random_values():
    code = LF.dynamic_map()
    v = torch.rand(20000) * 2 - 1
    idx = codebooks.encode_nearest(v, codebooks.encode_thresholds(code))
    dist = (v.double().unsqueeze(1) - code.double().unsqueeze(0)).abs()
    # argmin picks the first minimum, i.e. the lower index on a tie.
    assert torch.equal(idx, dist.argmin(dim=1))


def _traced_uses_of_the_default_tables(w):
    """Calls that take their codebooks from the functional API's defaults."""
    qw, st = LF.quantize_4bit(w, double_quant=True)
    q8, absmax = LF.quantize_blockwise(w)
    return qw, st.absmax, st.code, st.nested_code, q8, absmax


@pytest.mark.parametrize("trace", ["fake-mode", "make_fx", "export"])
def test_tracing_leaves_the_cached_tables_real(trace):
    """The default codebooks are cached for eager calls only: a trace (whose tensors are fake
    or traced) neither caches its tables nor takes the cached real ones, and later eager
    calls still get real tables."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    _tables._cached_codebook.cache_clear()
    codebooks._dynamic_map_cpu.cache_clear()
    w = torch.randn(8, 64)
    if trace == "fake-mode":
        with FakeTensorMode() as mode:
            out = _traced_uses_of_the_default_tables(mode.from_tensor(w))
        assert out[0].shape == (256, 1)
    elif trace == "make_fx":
        make_fx(_traced_uses_of_the_default_tables, tracing_mode="fake")(w)
    else:

        class Module(torch.nn.Module):
            def forward(self, w):
                return _traced_uses_of_the_default_tables(w)

        torch.export.export(Module(), (w,))
    qw, absmax, code, nested_code, q8, absmax8 = _traced_uses_of_the_default_tables(w)
    for t in (code, nested_code, absmax8):
        assert type(t) is torch.Tensor
    assert torch.equal(code, codebooks.nf4_code())
    assert torch.equal(nested_code, LF.dynamic_map())
    assert type(LF.dequantize_blockwise(q8, absmax8)) is torch.Tensor


def test_default_tables_compile_with_fullgraph():
    """torch.compile(fullgraph=True) traces the default codebooks (a literal, not the cache),
    with the results of eager calls."""
    torch._dynamo.reset()
    compiled = torch.compile(_traced_uses_of_the_default_tables, fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    w = torch.randn(8, 64)
    for got, want in zip(compiled(w), _traced_uses_of_the_default_tables(w)):
        assert torch.equal(got, want)


def test_an_optimizer_step_traced_with_fake_tensors_leaves_real_optimizers_working():
    """The optimizers' states share the dynamic maps through the same eager-only cache: a
    step under FakeTensorMode neither caches fake maps nor breaks a later real step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _tables._cached_codebook.cache_clear()
    codebooks._dynamic_map_cpu.cache_clear()
    with FakeTensorMode() as mode:
        p = torch.nn.Parameter(mode.from_tensor(torch.randn(5000)))
        p.grad = mode.from_tensor(torch.randn(5000))
        fake = lpk.optim.AdamW8bit([p])
        fake.step()
        assert isinstance(fake.state[p]["qmap1"], type(p.grad))  # a fake map, made here
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = lpk.optim.AdamW8bit([p])
    opt.step()
    assert type(opt.state[p]["qmap1"]) is torch.Tensor
    assert torch.equal(opt.state[p]["qmap2"], LF.dynamic_map(False))

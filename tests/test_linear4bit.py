"""``lpk.nn.Linear4bit`` / ``Params4bit``: construction, forward and backward against the
reference, compute dtypes and autocast, bitsandbytes-layout state dicts (torch.load with
weights_only, safetensors, bitsandbytes both ways), moves, copies, torch.compile, bad input.

The op itself is tested per backend elsewhere (test_fourbit_*.py); here the module must be
exactly the op on the right arguments, on every backend.
"""

import copy
import io
import json
import pickle
import re
import weakref

import pytest
import torch
from conftest import (
    assert_backward_keeps_no_activation,
    assert_export_round_trip,
    backend_params,
    run_on,
)
from torch import nn
from torch.autograd import forward_ad

import lowprec_kernels as lpk
from lowprec_kernels import functional as LF
from lowprec_kernels.nn import Linear4bit, Params4bit
from lowprec_kernels.nn import linear4bit as linear4bit_module
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A state dict's keys, in bitsandbytes' order (Linear4bit._save_to_state_dict there).
KEYS_NESTED = ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
               "weight.nested_quant_map"]  # fmt: skip
KEYS_SINGLE = ["weight", "bias", "weight.absmax", "weight.quant_map"]


def randn_nonzero(*shape, dtype=torch.float32):
    x = torch.randn(*shape)
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype)


def expected_keys(quant_type="nf4", double_quant=True):
    keys = KEYS_NESTED if double_quant else KEYS_SINGLE
    return keys + [f"weight.quant_state.bitsandbytes__{quant_type}"]


def w_deq(layer, dtype=torch.float32):
    return run_on("reference", LF.dequantize_4bit, layer.weight, layer.quant_state, dtype)


def assert_same_quantized(a: Linear4bit, b: Linear4bit):
    """Same codes, same QuantState, same bias."""
    assert torch.equal(a.weight, b.weight)
    sa, sb = a.quant_state, b.quant_state
    assert (sa.quant_type, sa.blocksize, sa.shape, sa.dtype, sa.nested) == (
        sb.quant_type, sb.blocksize, sb.shape, sb.dtype, sb.nested,
    )  # fmt: skip
    for name in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
        ta, tb = getattr(sa, name), getattr(sb, name)
        assert (ta is None and tb is None) or torch.equal(ta, tb), name
    assert (a.bias is None and b.bias is None) or torch.equal(a.bias, b.bias)


@pytest.fixture
def layer():
    return Linear4bit(100, 37)  # in % 64 != 0: blocks cross rows


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_constructor_initializes_like_linear_then_quantizes(quant_type, double_quant):
    torch.manual_seed(1)
    linear = nn.Linear(100, 37)
    torch.manual_seed(1)
    layer = Linear4bit(100, 37, quant_type=quant_type, blocksize=32, double_quant=double_quant)
    assert isinstance(layer, nn.Linear) and isinstance(layer.weight, Params4bit)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (1850, 1)
    assert layer.quant_state is layer.weight.quant_state
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (quant_type, 32, double_quant)
    # The same initialization as nn.Linear (same RNG draws), then quantized as LF does it.
    assert torch.equal(layer.bias, linear.bias)
    qw, st = run_on(
        "reference", LF.quantize_4bit, linear.weight.detach(), 32, quant_type, double_quant
    )
    assert torch.equal(layer.weight, qw) and torch.equal(layer.quant_state.absmax, st.absmax)
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.bias]
    assert f"quant_type={quant_type}" in repr(layer)


def test_constructor_dtype_device_and_no_bias():
    layer = Linear4bit(64, 8, bias=False, dtype=torch.bfloat16)
    assert layer.bias is None and layer.quant_state.dtype == torch.bfloat16
    assert layer.weight.dequantize().dtype == torch.bfloat16
    meta = Linear4bit(64, 8, device="meta")  # no memory, no init work: for large models
    assert meta.weight.device.type == "meta" and meta.quant_state.absmax.device.type == "meta"


def test_built_in_a_meta_device_context_then_to_empty_and_loaded():
    """torch.device("meta") as a context (how FSDP2 users build large models): construction
    works, the CPU codebooks cached on the way stay on the CPU, to_empty keeps a Params4bit and
    gives its QuantState memory on the target device, and a checkpoint then loads."""
    source = Linear4bit(64, 32)
    with torch.device("meta"):
        layer = Linear4bit(64, 32)
    assert layer.weight.is_meta and layer.quant_state.nested_absmax.is_meta
    assert lpk.reference.codebooks.dynamic_map().device.type == "cpu"
    layer.to_empty(device="cpu")
    st = layer.quant_state
    assert isinstance(layer.weight, Params4bit) and layer.weight.device.type == "cpu"
    tensors = (st.absmax, st.code, st.nested_absmax, st.nested_code, st.offset)
    assert all(t.device.type == "cpu" for t in tensors)
    assert (st.absmax.shape, st.nested_absmax.shape) == (
        source.quant_state.absmax.shape, source.quant_state.nested_absmax.shape)  # fmt: skip
    assert layer(randn_nonzero(2, 64)).shape == (2, 32)  # uninitialized values, as nn.Linear's
    layer.load_state_dict(source.state_dict())
    x = randn_nonzero(3, 64)
    assert torch.equal(layer(x), source(x))


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(quant_type="int4"), ValueError, "quant_type"),
        (dict(blocksize=48), ValueError, "blocksize"),
        (dict(compute_dtype="float16"), TypeError, "compute_dtype"),
        (dict(compute_dtype=torch.float64), TypeError, "compute_dtype"),
        (dict(compute_dtype=torch.int8), TypeError, "compute_dtype"),
    ],
)
def test_constructor_bad_settings(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Linear4bit(64, 8, **kwargs)


def test_reset_parameters_requantizes(layer):
    before = layer.weight.clone()
    torch.manual_seed(5)
    layer.reset_parameters()
    assert isinstance(layer.weight, Params4bit) and not torch.equal(layer.weight, before)
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == ("nf4", 64, True)
    torch.manual_seed(5)
    fresh = nn.Linear(100, 37)
    assert torch.equal(layer.bias, fresh.bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_linear(dtype):
    linear = nn.Linear(70, 24).to(dtype)
    snapshot = copy.deepcopy(linear.state_dict())
    layer = Linear4bit.from_linear(
        linear, quant_type="fp4", blocksize=32, double_quant=False, compute_dtype=torch.float16
    )
    qw, st = run_on("reference", LF.quantize_4bit, linear.weight.detach(), 32, "fp4", False)
    assert torch.equal(layer.weight, qw) and torch.equal(layer.quant_state.absmax, st.absmax)
    assert layer.quant_state.dtype == dtype and layer.compute_dtype == torch.float16
    assert layer.weight.device == linear.weight.device
    assert torch.equal(layer.bias, linear.bias) and layer.bias.requires_grad
    with torch.no_grad():
        linear.bias.add_(1)  # the layer holds a copy
    assert not torch.equal(layer.bias, linear.bias)
    assert torch.equal(linear.weight, snapshot["weight"]), "from_linear leaves linear alone"
    assert Linear4bit.from_linear(nn.Linear(64, 8, bias=False)).bias is None
    with pytest.raises(TypeError, match="linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))
    # A Linear8bitLt is an nn.Linear whose weight holds int8 codes
    with pytest.raises(TypeError, match=r"linear.weight must be a floating-point tensor"):
        Linear4bit.from_linear(lpk.nn.Linear8bitLt(64, 8))


# ---------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 5)], ids=str)
@pytest.mark.parametrize("device_backend", backend_params(include_reference=True))
def test_forward_is_the_op(device_backend, lead, dtype):
    device, backend = device_backend
    layer = Linear4bit(100, 37, dtype=dtype, device=device)
    x = randn_nonzero(*lead, 100, dtype=dtype).to(device)
    y = run_on(backend, layer, x)
    assert y.shape == (*lead, 37) and y.dtype == dtype
    expected = run_on(backend, LF.matmul_4bit, x, layer.weight, layer.quant_state, layer.bias)
    assert torch.equal(y, expected)
    # And the op is x @ W.T + b (within one rounding to x's dtype, fp32 summation over K).
    W = w_deq(layer).double()
    y64 = x.double() @ W.T + layer.bias.double()
    scale = x.double().abs() @ W.abs().T + layer.bias.double().abs()
    bound = 2 * (UNIT_ROUNDOFF[dtype] * y64.abs() + (100 * 2.0**-24 + UNIT_ROUNDOFF[dtype]) * scale)
    assert bool(((y.double() - y64).abs() <= bound + 2.0**-24).all())


def test_compute_dtype_casts_in_and_back():
    layer = Linear4bit(64, 16, compute_dtype=torch.float16)
    x = randn_nonzero(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = LF.matmul_4bit(x.half(), layer.weight, layer.quant_state, layer.bias.half())
    assert torch.equal(y, expected.float())


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_the_autocast_dtype(autocast_dtype):
    layer = Linear4bit(64, 16)
    x = randn_nonzero(3, 64)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = layer(x)
        ref_linear = nn.functional.linear(x, w_deq(layer), layer.bias)
    assert y.dtype == autocast_dtype == ref_linear.dtype, "as F.linear under autocast"
    expected = LF.matmul_4bit(x.to(autocast_dtype), layer.weight, layer.quant_state,
                              layer.bias.to(autocast_dtype))  # fmt: skip
    assert torch.equal(y, expected)
    # A layer with a compute_dtype still returns the input's dtype.
    layer.compute_dtype = torch.float32
    with torch.autocast("cpu", dtype=autocast_dtype):
        assert layer(x).dtype == torch.float32


def test_autocast_backward_with_grad_scaler():
    layer = Linear4bit(64, 16)
    opt = torch.optim.SGD([layer.bias], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = randn_nonzero(4, 64).requires_grad_()
    before = layer.bias.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().square().mean()
    scaler.scale(loss).backward()
    assert x.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    scaler.step(opt)
    scaler.update()
    assert layer.bias.isfinite().all() and not torch.equal(layer.bias, before)
    assert layer.weight.grad is None


@pytest.mark.parametrize("compute_dtype", [None, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_to_input_and_bias_only(dtype, compute_dtype):
    layer = Linear4bit(70, 33, dtype=dtype, compute_dtype=compute_dtype)
    x = randn_nonzero(2, 3, 70, dtype=dtype).requires_grad_()
    y = layer(x)
    gy = randn_nonzero(*y.shape, dtype=dtype)
    y.backward(gy)
    assert layer.weight.grad is None
    assert x.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    # Against the reference op's backward on the same (cast) arguments ...
    cd = compute_dtype or dtype
    x_r = x.detach().to(cd).requires_grad_()
    b_r = layer.bias.detach().to(cd).requires_grad_()
    run_on("reference", LF.matmul_4bit, x_r, layer.weight, layer.quant_state, b_r).backward(
        gy.to(cd)
    )
    assert torch.equal(x.grad, x_r.grad.to(dtype)) and torch.equal(
        layer.bias.grad, b_r.grad.to(dtype)
    )
    # ... and against float64: grad_x = gy @ W, grad_b = gy summed over every row. Rounding
    # W and gy into the compute dtype (u each), fp32 accumulation (K * 2**-24), two more
    # roundings (into the compute dtype, then x's): bound on the sum of magnitudes, doubled.
    W = w_deq(layer).double()
    g64 = gy.double().reshape(-1, 33)
    u = UNIT_ROUNDOFF[cd] + UNIT_ROUNDOFF[dtype]
    bound_x = 2 * (2 * u + 33 * 2.0**-24) * (g64.abs() @ W.abs()) + 1e-30
    assert bool(((x.grad.double().reshape(-1, 70) - g64 @ W).abs() <= bound_x).all())
    bound_b = 2 * (2 * u + 6 * 2.0**-24) * g64.abs().sum(0)
    assert bool(((layer.bias.grad.double() - g64.sum(0)).abs() <= bound_b).all())


@pytest.mark.parametrize("in_features", [1024, 1023])  # even: split tiles; odd: plain ones
@pytest.mark.parametrize("dtype", DTYPES)
def test_trainable_layer_on_gemm_tiles_of_two_threads(dtype, in_features):
    """A layer of several GEMM tiles (2 MiB each) with a trainable bias, input that requires
    grad, past the GEMV's rows, on two threads: the tiles' GEMMs run on torch's worker
    threads (which refused operands that require grad, and outputs made under
    inference_mode), and give nn.Linear's result."""
    torch.manual_seed(0)
    layer = Linear4bit(in_features, 2048, dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (17, 64):
            x = randn_nonzero(rows, in_features, dtype=dtype).requires_grad_()
            y = layer(x)
            y.float().sum().backward()
            assert x.grad is not None and layer.bias.grad is not None
            with torch.no_grad():
                want = torch.nn.functional.linear(
                    x.double(), w_deq(layer).double(), layer.bias.double()
                )
                u = UNIT_ROUNDOFF[dtype]
                bound = (2 * u + in_features * 2.0**-24) * (
                    x.double().abs() @ w_deq(layer).double().abs().T + layer.bias.double().abs()
                ) + 2 * u * want.abs()
                assert bool(((y.double() - want).abs() <= 2 * bound).all()), rows
            layer.bias.grad = None
            with torch.inference_mode():  # an inference-mode output, written by the workers
                assert torch.equal(layer(x), y)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device_backend", backend_params(include_reference=True))
def test_forward_mode_ad(device_backend, dtype):
    """Forward-mode AD (dual tensors, torch.func.jvp): the primal is the plain forward, the
    tangent dx @ W.T + dbias, the transpose of the backward formula. (An eager call used to
    return no tangent at all.)"""
    device, backend = device_backend
    layer = Linear4bit(100, 37, dtype=dtype, device=device)
    x, tx = (randn_nonzero(2, 3, 100, dtype=dtype).to(device) for _ in range(2))
    tb = randn_nonzero(37, dtype=dtype).to(device)
    plain = run_on(backend, layer, x)
    y, tangent = run_on(backend, torch.func.jvp, layer, (x,), (tx,))
    assert torch.equal(y, plain) and tangent.dtype == dtype
    assert torch.equal(tangent, run_on(backend, LF.matmul_4bit, tx, layer.weight,
                                       layer.quant_state))  # fmt: skip
    # The bias's tangent, through the functional op and torch.autograd.forward_ad.
    with forward_ad.dual_level(), lpk.use_backend(backend):
        dual = LF.matmul_4bit(forward_ad.make_dual(x, tx), layer.weight, layer.quant_state,
                              forward_ad.make_dual(layer.bias.detach(), tb))  # fmt: skip
        y_dual, tangent_dual = forward_ad.unpack_dual(dual)
        bias_only = forward_ad.unpack_dual(
            LF.matmul_4bit(
                x, layer.weight, layer.quant_state, forward_ad.make_dual(layer.bias.detach(), tb)
            )
        )
        no_tangent = forward_ad.unpack_dual(layer(x))
    assert torch.equal(y_dual, plain) and torch.equal(tangent_dual, tangent + tb)
    assert torch.equal(bias_only.tangent, tb.expand_as(plain))
    assert no_tangent.tangent is None and torch.equal(no_tangent.primal, plain)
    # Against float64 (as test_forward_is_the_op): W, not its transpose or another layout.
    W = w_deq(layer).double().to(device)
    t64 = tx.double() @ W.T
    bound = 2 * (2 * UNIT_ROUNDOFF[dtype] + 100 * 2.0**-24) * (tx.double().abs() @ W.abs().T)
    assert bool(((tangent.double() - t64).abs() <= bound + 2.0**-24).all())


@pytest.mark.parametrize("device_backend", backend_params(include_reference=True))
def test_forward_mode_transforms(device_backend):
    """The forward rule lives in the op's Autograd kernel, so it holds however the op is
    reached: a direct torch.ops call, vmap inside a dual level, nested forward mode (a
    forward-over-forward Hessian), torch.compile of a jvp, torch.func.linearize. torch.func's reverse-mode
    transforms are refused by name, not answered with a wrong gradient."""
    device, backend = device_backend
    layer = Linear4bit(64, 8, device=device)
    W = w_deq(layer).to(device)
    dense = nn.Linear(64, 8, device=device)
    with torch.no_grad():
        dense.weight.copy_(W)
        dense.bias.copy_(layer.bias)
    x, tx = (randn_nonzero(3, 64).to(device) for _ in range(2))
    op_args = (layer.weight, *layer.quant_state.op_args(), layer.bias)
    with forward_ad.dual_level(), lpk.use_backend(backend):
        direct = forward_ad.unpack_dual(
            torch.ops.lowprec.matmul_4bit(forward_ad.make_dual(x, tx), *op_args)
        )
        batched = torch.vmap(layer)(x.unsqueeze(1))
    assert torch.equal(
        direct.tangent, run_on(backend, LF.matmul_4bit, tx, layer.weight, layer.quant_state)
    )
    assert torch.equal(batched.squeeze(1), run_on(backend, layer, x))

    def loss(module):
        return lambda v: torch.sin(module(v)).sum()

    hessian = run_on(backend, torch.func.jacfwd(torch.func.jacfwd(loss(layer))), x[0])
    torch.testing.assert_close(hessian, torch.func.jacfwd(torch.func.jacfwd(loss(dense)))(x[0]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda v, t: torch.func.jvp(layer, (v,), (t,)))
    _, tangent = run_on(backend, compiled, x, tx)
    torch.testing.assert_close(tangent, tx @ W.T)
    # linearize traces the jvp with make_fx, which takes the weight as a constant: it refused
    # the Params4bit subclass until the layer passed the op a plain-Tensor alias of it.
    y, jvp_of = run_on(backend, torch.func.linearize, layer, x)
    assert torch.equal(y, run_on(backend, layer, x))
    torch.testing.assert_close(run_on(backend, jvp_of, tx), tx @ W.T)
    with pytest.raises(NotImplementedError, match="reverse-mode transforms"):
        run_on(backend, torch.func.grad(loss(layer)), x[0])


def test_make_fx_traces_the_layer():
    """make_fx takes the weight as a constant of the graph (a Params4bit used to stop it)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = Linear4bit(64, 8)
    x = randn_nonzero(3, 64)
    graph = make_fx(layer)(x)
    assert "lowprec.matmul_4bit" in graph.code
    assert torch.equal(graph(x), layer(x))


@pytest.mark.parametrize("double_quant", [False, True])
def test_torch_export(tmp_path, double_quant):
    """torch.export traces the layer (it swaps plain tensors in for the parameters, so the
    layer keeps its Params4bit's quant_state beside them), with a dynamic batch, and the
    saved program loads and computes the same output."""
    model = nn.Sequential(
        Linear4bit(64, 40, double_quant=double_quant), nn.ReLU(), Linear4bit(40, 9, bias=False)
    )
    assert_export_round_trip(model, lambda rows: randn_nonzero(rows, 64), "matmul_4bit", tmp_path)


def test_export_follows_a_weight_replaced_in_place(tmp_path):
    """The exported program computes with the codes the layer holds at export time, however
    they were put there (accelerate writes _parameters directly), and after a pickle round
    trip."""
    layer = Linear4bit(64, 32)
    replacement = Params4bit.from_weight(torch.randn(32, 64) * 10)
    layer._parameters["weight"] = replacement
    assert_export_round_trip(layer, lambda rows: randn_nonzero(rows, 64), "matmul_4bit", tmp_path)
    layer.register_parameter("weight", Params4bit.from_weight(torch.randn(32, 64)))
    assert_export_round_trip(layer, lambda rows: randn_nonzero(rows, 64), "matmul_4bit", tmp_path)
    restored = pickle.loads(pickle.dumps(layer))
    assert_export_round_trip(
        restored, lambda rows: randn_nonzero(rows, 64), "matmul_4bit", tmp_path
    )


def test_pickles_hold_plain_dicts_and_older_ones_load():
    """The parameter dict pickles as a plain dict (no private class in the file), and a layer
    pickled before the dict existed (or with the note of its first version) loads into one."""
    from lowprec_kernels.nn.linear4bit import _ParameterSlots

    layer = Linear4bit(64, 8)
    x = randn_nonzero(2, 64)
    assert b"_ParameterSlots" not in pickle.dumps(layer)
    older = copy.copy(layer)
    older.__dict__["_parameters"] = dict(layer._parameters)
    older.__dict__["_packed_weight"] = layer.weight
    restored = pickle.loads(pickle.dumps(older))
    assert isinstance(restored._parameters, _ParameterSlots)
    assert "_packed_weight" not in restored.__dict__
    restored._parameters["weight"] = nn.Parameter(
        restored.weight.as_subclass(torch.Tensor), requires_grad=False
    )
    assert torch.equal(restored(x), layer(x))


def test_codes_are_not_kept_alive():
    """The layer notes only its codes' quant_state beside them, never the codes: codes that
    are replaced (FSDP2 shards them) or deleted are freed."""
    layer = Linear4bit(64, 32)
    codes = weakref.ref(layer.weight)
    layer._parameters["weight"] = nn.Parameter(
        layer.weight.as_subclass(torch.Tensor).clone(), requires_grad=False
    )
    assert codes() is None
    codes = weakref.ref(layer.weight)
    del layer.weight
    assert codes() is None


def test_plain_codes_stand_in_for_the_weight():
    """A plain tensor of the packed codes' shape and dtype in the weight's place (as FSDP2's
    all-gathered weight is) is decoded with the layer's quant_state; a plain Parameter of
    another shape is refused by name, and so are the batched codes of stacked layers under
    vmap (their quant_states are not stacked)."""
    layer = Linear4bit(64, 8)
    x = randn_nonzero(2, 64)
    expected = layer(x)
    layer._parameters["weight"] = nn.Parameter(
        layer.weight.as_subclass(torch.Tensor).clone(), requires_grad=False
    )
    assert torch.equal(layer(x), expected)
    layer.weight = nn.Parameter(torch.randn(8, 64), requires_grad=False)
    with pytest.raises(TypeError, match="weight must be a Params4bit"):
        layer(x)
    layers = [Linear4bit(64, 8) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(layers)

    def call(p, b):
        return torch.func.functional_call(layers[0], (p, b), (x,))

    with pytest.raises(TypeError, match="vmap over stacked layers"):
        torch.vmap(call)(params, buffers)


def test_backward_keeps_no_activation():
    """The op's autograd keeps the weight's arguments only (see the helper)."""
    assert_backward_keeps_no_activation(Linear4bit(128, 16), randn_nonzero(4, 128))


# ---------------------------------------------------------------- state dict


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_layout(quant_type, double_quant):
    layer = Linear4bit(100, 37, quant_type=quant_type, double_quant=double_quant)
    sd = layer.state_dict()
    assert list(sd) == expected_keys(quant_type, double_quant)
    assert all(type(v) is torch.Tensor for v in sd.values()), "plain tensors only"
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (1850, 1)
    kept = layer.state_dict(keep_vars=True)
    assert kept["weight"] is layer.weight and kept["bias"] is layer.bias


@pytest.mark.parametrize("checkpoint", ["quantized", "float"])
def test_load_with_assign_fills_a_meta_layer(checkpoint):
    """load_state_dict(assign=True) takes the state dict's tensors, on their device, as
    nn.Module does: a layer built on the meta device is filled without a copy."""
    source = Linear4bit(128, 16)
    dense = nn.Linear(128, 16)
    sd = source.state_dict() if checkpoint == "quantized" else dense.state_dict()
    layer = Linear4bit(128, 16, device="meta")
    layer.load_state_dict(sd, assign=True)
    assert layer.weight.device.type == layer.quant_state.absmax.device.type == "cpu"
    x = randn_nonzero(3, 128)
    if checkpoint == "quantized":
        assert layer.weight.data_ptr() == sd["weight"].data_ptr()  # assigned, not copied
        assert torch.equal(layer(x), source(x))
    else:
        assert torch.equal(layer(x), Linear4bit.from_linear(dense)(x))


def _reload_check(sd, source: Linear4bit, fresh: Linear4bit):
    fresh.load_state_dict(sd, strict=True)
    assert isinstance(fresh.weight, Params4bit) and not fresh.weight.requires_grad
    assert_same_quantized(fresh, source)
    x = randn_nonzero(5, source.in_features)
    assert torch.equal(fresh(x), source(x))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_torch_save_load_weights_only(quant_type, double_quant):
    source = Linear4bit(
        100, 37, quant_type=quant_type, double_quant=double_quant, dtype=torch.float16
    )
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # A fresh layer with other settings takes the checkpoint's.
    other = "fp4" if quant_type == "nf4" else "nf4"
    fresh = Linear4bit(100, 37, quant_type=other, blocksize=32, double_quant=not double_quant)
    _reload_check(sd, source, fresh)
    assert fresh.quant_state.dtype == torch.float16


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = Linear4bit(100, 37, dtype=torch.bfloat16)
    path = tmp_path / "layer.safetensors"
    safetensors_torch.save_file(source.state_dict(), str(path))
    _reload_check(safetensors_torch.load_file(str(path)), source, Linear4bit(100, 37))


def test_load_into_a_model_with_prefixes():
    source = nn.Sequential(Linear4bit(64, 32), nn.ReLU(), Linear4bit(32, 8, quant_type="fp4"))
    fresh = nn.Sequential(Linear4bit(64, 32), nn.ReLU(), Linear4bit(32, 8))
    fresh.load_state_dict(source.state_dict(), strict=True)
    x = randn_nonzero(3, 64)
    assert torch.equal(fresh(x), source(x)) and fresh[2].quant_type == "fp4"


def test_float_linear_state_dict_is_quantized_with_the_layers_settings():
    linear = nn.Linear(100, 37)
    layer = Linear4bit(100, 37, quant_type="fp4", blocksize=32)
    layer.load_state_dict(linear.state_dict(), strict=True)
    assert_same_quantized(layer, Linear4bit.from_linear(linear, quant_type="fp4", blocksize=32))
    with pytest.raises(ValueError, match="weight"):
        Linear4bit(100, 38).load_state_dict(linear.state_dict())


@pytest.mark.parametrize(
    "drop",
    [
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ],  # fmt: skip
)
def test_truncated_state_dict_names_the_missing_key(layer, drop):
    sd = layer.state_dict()
    del sd[drop]
    with pytest.raises(ValueError, match=re.escape(drop.removesuffix("nf4"))):
        Linear4bit(100, 37).load_state_dict(sd)


def test_state_dict_mismatches_raise(layer):
    sd = layer.state_dict()
    with pytest.raises(ValueError, match=r"shape \[37, 100\]"):
        Linear4bit(100, 36).load_state_dict(sd)
    for bad_weight in (sd["weight"][:-1], sd["weight"].to(torch.bfloat16)):
        with pytest.raises(ValueError, match="'weight' must hold 1850 bytes"):
            Linear4bit(100, 37).load_state_dict(dict(sd, weight=bad_weight))
    # Quantized entries without the weight: nothing to load them into.
    orphan = {k: v for k, v in sd.items() if k != "weight"}
    with pytest.raises(RuntimeError, match="weight.absmax"):
        Linear4bit(100, 37).load_state_dict(orphan, strict=True)
    result = Linear4bit(100, 37).load_state_dict({"bias": sd["bias"]}, strict=False)
    assert result.missing_keys == [
        "weight",
        *KEYS_NESTED[2:],
        "weight.quant_state.bitsandbytes__nf4",
    ]


def test_unknown_weight_entries_are_reported(layer):
    """Only the QuantState's own entries are taken with the weight; any other "weight.*" key
    is unexpected, as nn.Module reports it."""
    sd = dict(layer.state_dict(), **{"weight.typo_absmax": torch.zeros(3)})
    with pytest.raises(
        RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight.typo_absmax"'
    ):
        Linear4bit(100, 37).load_state_dict(sd)
    fresh = Linear4bit(100, 37)
    assert fresh.load_state_dict(sd, strict=False).unexpected_keys == ["weight.typo_absmax"]
    assert_same_quantized(fresh, layer)


def test_meta_layer_state_dict_has_a_real_ones_keys_and_shapes(layer):
    """For empty-weight loaders, which read a meta model's state dict keys and shapes; the
    packed header is a meta tensor there (its offset has no value on the meta device)."""
    for meta in (Linear4bit(100, 37, device="meta"), copy.deepcopy(layer).to("meta")):
        got, want = meta.state_dict(), layer.state_dict()
        assert list(got) == list(want)
        assert all(got[k].is_meta for k in got)
        assert {k: got[k].shape for k in KEYS_NESTED} == {k: want[k].shape for k in KEYS_NESTED}


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 48), nn.Linear(64, 48)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x) + 2 * self.b(x)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_tied_weights_stay_tied_through_loading(method):
    """A state dict loads into a weight that layers share in place, as nn.Module loads: the
    tie and its single copy survive; a checkpoint that stores the shared entries once
    (b's dropped, as safetensors and Hugging Face checkpoints do) loads as well."""
    torch.manual_seed(0)
    source = lpk.nn.quantize_model(_Tied(), method=method, skip=())
    x = torch.randn(3, 64)
    full = source.state_dict()
    deduplicated = {k: v for k, v in full.items() if not k.startswith("b.weight")}
    deduplicated.pop("b.SCB", None)
    for sd, strict in ((full, True), (deduplicated, False)):
        target = lpk.nn.quantize_model(_Tied(), method=method, skip=())
        shared = target.a.weight
        target.load_state_dict(sd, strict=strict)
        assert target.a.weight is shared and target.b.weight is shared
        assert torch.equal(target(x), source(x))


@pytest.mark.whole_storage  # save_model refuses shared tensors smaller than their storage
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_safetensors_save_model_of_tied_layers(method, tmp_path):
    """safetensors' save_model / load_model (its way to store shared tensors once)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    source = lpk.nn.quantize_model(_Tied(), method=method, skip=())
    path = str(tmp_path / "tied.safetensors")
    safetensors_torch.save_model(source, path)
    target = lpk.nn.quantize_model(_Tied(), method=method, skip=())
    assert safetensors_torch.load_model(target, path) == (set(), [])
    x = torch.randn(3, 64)
    assert target.a.weight is target.b.weight and torch.equal(target(x), source(x))


_MALFORMED = {
    # bitsandbytes' own state dict after a CPU inference forward (no double quant): its
    # repacking leaves absmax transposed, in bf16. The same count in fp32 gave wrong outputs.
    "absmax-transposed-bf16": (False, "absmax", lambda t: t.reshape(64, 4).T.bfloat16()),
    "absmax-transposed": (False, "absmax", lambda t: t.reshape(64, 4).T.contiguous()),
    "absmax-short": (False, "absmax", lambda t: t[:-1].clone()),
    "absmax-fp16": (False, "absmax", lambda t: t.half()),
    "quant_map-short": (False, "quant_map", lambda t: t[:8].clone()),
    "nested_absmax-empty": (True, "nested_absmax", lambda t: t[:0].clone()),
    "absmax-codes-short": (True, "absmax", lambda t: t[:10].clone()),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_checkpoint_refused_at_load(case):
    """Entries of another dtype, length or layout fail in load_state_dict, naming the entry,
    and leave the layer as it was (they used to load, then fail in the first forward, or give
    wrong outputs where only the layout differed)."""
    double_quant, key, change = _MALFORMED[case]
    torch.manual_seed(0)
    sd = Linear4bit(256, 64, blocksize=64, double_quant=double_quant).state_dict()
    sd["weight." + key] = change(sd["weight." + key])
    layer = Linear4bit(256, 64, blocksize=64, double_quant=double_quant)
    before = copy.deepcopy(layer)
    with pytest.raises((ValueError, TypeError), match="loading 'weight'"):
        layer.load_state_dict(sd)
    assert_same_quantized(layer, before)


def test_params4bit_refuses_float_data():
    """bitsandbytes' Params4bit(w) quantizes later, on .to(device); ours would have kept the
    float weight as 'codes' with no quant_state, failing only at the first forward."""
    with pytest.raises(TypeError, match="Params4bit.from_weight"):
        Params4bit(torch.randn(8, 64))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_params4bit_answers_bitsandbytes_attribute_names(quant_type, double_quant):
    """Code written for bitsandbytes reads weight.blocksize, .quant_type,
    .compress_statistics, .quant_storage and .bnb_quantized; they raised AttributeError."""
    w = Params4bit.from_weight(torch.randn(8, 64), 32, quant_type, double_quant)
    assert (w.blocksize, w.quant_type, w.compress_statistics) == (32, quant_type, double_quant)
    assert w.quant_storage == torch.uint8 and w.bnb_quantized
    bare = Params4bit(torch.zeros(4, 1, dtype=torch.uint8))
    assert (bare.blocksize, bare.quant_type, bare.compress_statistics) == (None, None, None)
    assert not bare.bnb_quantized
    with pytest.raises(AttributeError):  # views of the quant_state, not settings of their own
        w.blocksize = 64


def test_plain_codes_standing_in_keep_repr_properties_and_state_dict(layer):
    """A plain Parameter of the codes in the weight's place (what FSDP2's unshard and
    torch.export put there): forward decoded it, but quant_state, repr and state_dict read the
    weight's own quant_state and failed with a misleading AttributeError."""
    want = layer.state_dict()
    layer._parameters["weight"] = nn.Parameter(layer.weight.as_subclass(torch.Tensor).detach(),
                                               requires_grad=False)  # fmt: skip
    assert layer.quant_state.quant_type == "nf4" and "quant_type=nf4" in repr(layer)
    got = layer.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    layer.weight = nn.Parameter(layer.weight.float())  # no longer the codes: repr still works
    assert "not quantized codes" in repr(layer)
    with pytest.raises(TypeError, match="weight must be a Params4bit"):
        _ = layer.quant_state


@pytest.mark.parametrize("in_place", [True, False])
def test_loading_copies_instead_of_aliasing(layer, in_place, monkeypatch):
    if not in_place:  # the path that replaces the Params4bit (as for FSDP's sharded codes)
        monkeypatch.setattr(linear4bit_module, "_same_layout", lambda a, b: False)
    sd = copy.deepcopy(layer.state_dict())  # (a state dict's tensors are views of the layer's)
    fresh = Linear4bit(100, 37)
    fresh.load_state_dict(sd)
    sd["weight.absmax"].zero_()
    sd["weight"].zero_()
    assert_same_quantized(fresh, layer)


# ---------------------------------------------------------------- bitsandbytes, both ways


def _bnb_layer(bnb, linear, quant_type, double_quant):
    """bitsandbytes' Linear4bit holding ``linear``'s weights, quantized on the CPU: it
    quantizes on the first move to a device (``Params4bit._quantize`` via ``.to``)."""
    theirs = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type=quant_type,
                               compress_statistics=double_quant)  # fmt: skip
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    assert theirs.weight.bnb_quantized and theirs.weight.dtype == torch.uint8
    return theirs


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_codes_stored_in_another_dtype_load(storage):
    """bitsandbytes' quant_storage (FSDP-QLoRA's bf16, say) holds the packed bytes in wider
    elements: they load as the same bytes (they were refused)."""
    torch.manual_seed(0)
    source = Linear4bit(256, 32)
    sd = source.state_dict()
    sd["weight"] = sd["weight"].reshape(-1).view(storage).reshape(-1, 1).clone()
    target = Linear4bit(256, 32)
    target.load_state_dict(sd)
    assert_same_quantized(target, source)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_bitsandbytes_quant_storage_loads_here(storage):
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(256, 32)
    theirs = bnb.nn.Linear4bit(256, 32, quant_type="nf4", quant_storage=storage)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    sd = theirs.state_dict()
    assert sd["weight"].dtype == storage
    ours = Linear4bit(256, 32)
    ours.load_state_dict(sd, strict=True)
    want = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(ours.weight.dequantize(), want)


def _close_to(ours, theirs, K):
    # Same decoded weights; bitsandbytes multiplies in fp32 and may fuse the double-quant
    # decode: fp32 summation over K terms relative to the sum of magnitudes.
    return torch.testing.assert_close(ours, theirs, rtol=K * 2.0**-23, atol=K * 2.0**-23)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_dict_loads_here(quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(200, 24)
    theirs = _bnb_layer(bnb, linear, quant_type, double_quant)
    sd = theirs.state_dict()  # before any forward (their CPU forward may repack the weight)
    assert list(sd) == expected_keys(quant_type, double_quant)
    ours = Linear4bit(200, 24)
    ours.load_state_dict(sd, strict=True)
    assert (ours.quant_type, ours.double_quant) == (quant_type, double_quant)
    assert list(ours.state_dict()) == list(sd)
    for k, v in ours.state_dict().items():
        if "quant_state" not in k:
            assert torch.equal(v, sd[k]), k
    x = randn_nonzero(3, 200)
    with torch.no_grad():
        _close_to(ours(x), theirs(x), 200)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_our_state_dict_loads_in_bitsandbytes(quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    ours = Linear4bit.from_linear(
        nn.Linear(200, 24), quant_type=quant_type, double_quant=double_quant
    )
    sd = ours.state_dict()
    # bitsandbytes' Linear4bit has no loader for quantized state dicts of its own; its
    # documented path (the one transformers takes) is Params4bit.from_prequantized.
    theirs = bnb.nn.Linear4bit(200, 24, quant_type=quant_type, compress_statistics=double_quant)
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], stats, device="cpu", module=theirs
    )
    theirs.bias = nn.Parameter(sd["bias"].clone())
    assert list(theirs.state_dict()) == list(sd)
    x = randn_nonzero(3, 200)
    with torch.no_grad():
        _close_to(ours(x), theirs(x), 200)


# ---------------------------------------------------------------- moves and copies


def test_to_dtype_keeps_the_weight_quantized(layer):
    codes = layer.weight.clone()
    state = layer.quant_state
    for convert, dtype in [(lambda m: m.to(torch.float16), torch.float16),
                           (lambda m: m.bfloat16(), torch.bfloat16),
                           (lambda m: m.half(), torch.float16),
                           (lambda m: m.float(), torch.float32)]:  # fmt: skip
        assert convert(layer) is layer
        assert isinstance(layer.weight, Params4bit) and torch.equal(layer.weight, codes)
        assert layer.quant_state.dtype == torch.float32 and layer.quant_state.absmax is state.absmax
        assert layer.bias.dtype == dtype
        x = randn_nonzero(2, 100, dtype=dtype)
        assert layer(x).dtype == dtype
    with pytest.raises(TypeError, match="uint8"):
        layer.weight.to(torch.float16)


def test_to_device_moves_codes_and_state(layer, device):
    for target in (device, "meta"):
        moved = copy.deepcopy(layer).to(target)
        st = moved.quant_state
        assert isinstance(moved.weight, Params4bit) and moved.weight.device.type == target
        assert {
            t.device.type for t in (st.absmax, st.code, st.nested_absmax, st.nested_code, st.offset)
        } == {target}
    assert layer.to(layer.weight.device) is layer
    weight = layer.weight
    assert weight.to(weight.device) is weight and weight.cpu().quant_state is weight.quant_state


def test_deepcopy_and_pickle_keep_the_weight_quantized(layer):
    x = randn_nonzero(4, 100)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone.weight, Params4bit)
        assert_same_quantized(clone, layer)
        assert torch.equal(clone(x), y)
        assert clone.weight.data_ptr() != layer.weight.data_ptr()
        assert clone.quant_state.absmax.data_ptr() != layer.quant_state.absmax.data_ptr()
    param = pickle.loads(pickle.dumps(layer.weight))
    assert type(param) is Params4bit and param.quant_state.quant_type == "nf4"
    buf = io.BytesIO()
    torch.save(layer, buf)  # the whole module (a trusted pickle, not weights_only)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_detach_keeps_the_type(layer):
    detached = layer.weight.detach()
    assert type(detached) is Params4bit and detached.quant_state is layer.quant_state
    assert type(nn.Parameter(layer.weight, requires_grad=False)) is Params4bit


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(3)
    model = nn.Sequential(
        Linear4bit(64, 48), nn.GELU(), Linear4bit(48, 32, bias=False), nn.SiLU(),
        Linear4bit(32, 8, quant_type="fp4", blocksize=32),
    )  # fmt: skip
    x = randn_nonzero(5, 64).requires_grad_()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    y_eager = model(x)
    y_eager.square().sum().backward()
    # The 4-bit ops are opaque to the compiler (custom ops), so they compute exactly as in
    # eager; Inductor's fused GELU / SiLU may differ from eager's by an ulp or two, which
    # the layers after them carry: a few fp32 ulps.
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled, x.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error(layer):
    with pytest.raises(TypeError, match="x must have dtype"):
        layer(torch.ones(2, 100, dtype=torch.int32))
    layer.compute_dtype = torch.float16  # an integer x is not cast into the compute dtype
    with pytest.raises(TypeError, match="x must have dtype"):
        layer(torch.ones(2, 100, dtype=torch.int64))
    layer.compute_dtype = None
    with pytest.raises(ValueError, match="x must have last dimension in_features=100"):
        layer(torch.ones(2, 99))
    with pytest.raises(ValueError, match="x must be on A's device"):
        layer(torch.ones(2, 100, device="meta"))


def test_mismatched_quant_state_gets_a_clear_error(layer):
    other = Linear4bit(64, 37)
    layer.weight.quant_state = other.quant_state  # a state for another shape
    with pytest.raises(ValueError, match="A must have"):
        layer(torch.ones(2, 100))
    layer.weight.quant_state = Linear4bit(100, 37, blocksize=32).quant_state
    layer.weight.quant_state.blocksize = 64  # scales for blocks of 32, read as blocks of 64
    with pytest.raises(ValueError, match="absmax must be 1-D of 58"):
        layer(torch.ones(2, 100))
    layer.weight.quant_state = None
    with pytest.raises(TypeError, match="quant_state"):
        layer(torch.ones(2, 100))


def test_bitsandbytes_keywords_carry_over():
    """bitsandbytes' ``compress_statistics`` is double_quant by another name, and its
    ``quant_storage`` may be the byte storage this layer keeps; anything else is refused."""
    for compress in (True, False, 1, 0):
        layer = Linear4bit(64, 32, compress_statistics=compress, quant_storage=torch.uint8)
        assert layer.double_quant is bool(compress)
    with pytest.raises(ValueError, match="compress_statistics .* double_quant is False"):
        Linear4bit(64, 32, double_quant=False, compress_statistics=True)
    with pytest.raises(ValueError, match="quant_storage must be torch.uint8"):
        Linear4bit(64, 32, quant_storage=torch.bfloat16)


def test_quant_state_dtype_is_one_the_ops_take():
    """A QuantState's dtype is what dequantize_4bit returns: refused when it is built (by hand
    or from a checkpoint header) with one the ops cannot return, not at the first decode."""
    qw, st = LF.quantize_4bit(torch.randn(16, 64))
    header_key = next(k for k in st.as_dict() if k.startswith("quant_state."))
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float16 or"):
        lpk.QuantState(quant_type="nf4", blocksize=64, shape=(16, 64), dtype=torch.float64,
                       absmax=st.absmax, code=st.code)  # fmt: skip
    packed = st.as_dict()
    header = json.loads(bytes(packed[header_key].tolist()))
    bad = {**packed, header_key: torch.tensor(list(json.dumps({**header, "dtype": "float64"})
                                                    .encode()), dtype=torch.uint8)}  # fmt: skip
    with pytest.raises(TypeError, match="got torch.float64"):
        lpk.QuantState.from_dict(bad)


def test_quant_state_from_an_unpacked_dict_takes_a_dtype_or_its_name():
    qw, st = LF.quantize_4bit(torch.randn(16, 64), double_quant=True)
    unpacked = {"quant_type": "nf4", "blocksize": 64, "shape": [16, 64], "absmax": st.absmax,
                "quant_map": st.code, "nested_absmax": st.nested_absmax,
                "nested_quant_map": st.nested_code, "nested_blocksize": st.nested_blocksize,
                "nested_offset": float(st.offset)}  # fmt: skip
    for dtype in (torch.float32, "float32", "torch.float32"):
        again = lpk.QuantState.from_dict({**unpacked, "dtype": dtype})
        assert again.dtype == torch.float32
        assert torch.equal(LF.dequantize_4bit(qw, again), LF.dequantize_4bit(qw, st))
    with pytest.raises(ValueError, match="nested_offset must be a number, got 'abc'"):
        lpk.QuantState.from_dict({**unpacked, "dtype": "float32", "nested_offset": "abc"})
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or its name"):
        lpk.QuantState.from_dict({**unpacked, "dtype": "float99"})


def test_a_layer_without_weight_elements_is_refused_by_its_features():
    with pytest.raises(ValueError, match=r"Linear4bit: in_features and out_features must be "
                                         r"positive .* in_features=0"):  # fmt: skip
        Linear4bit(0, 8)
    with pytest.raises(ValueError, match=r"Linear4bit: .* out_features=0"):
        Linear4bit.from_linear(nn.Linear(8, 0))

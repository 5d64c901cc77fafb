"""``lpk.nn.Linear8bitLt``: construction, forward on every backend, autograd, autocast,
state_dict compatibility with bitsandbytes (both directions, strict), serialization,
dtype/device moves, torch.compile, and bad input.
"""

import copy
import io
import pickle
import types

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
from lowprec_kernels.nn import Linear8bitLt
from lowprec_kernels.reference.rounding import UNIT_ROUNDOFF

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATE_DICT_KEYS = ["weight", "bias", "SCB", "weight_format"]  # bitsandbytes', in its order


@pytest.fixture(params=backend_params(include_reference=True))
def device_backend(request):
    """Every backend (reference included) on every device."""
    return request.param


def randn(*shape, dtype=torch.float32, device="cpu"):
    x = torch.randn(*shape)
    return torch.where(x == 0, torch.full_like(x, 0.5), x).to(dtype).to(device)


def linear(in_f, out_f, dtype=torch.float32, device="cpu", bias=True):
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
    if bias:
        with torch.no_grad():
            lin.bias.copy_(randn(out_f) * 0.1)
    return lin


def activations(*shape, dtype=torch.float32, device="cpu", outlier_cols=(1,)):
    """Within +-3, except columns ``outlier_cols`` of magnitude ~20..40."""
    x = randn(*shape).clamp(-3, 3)
    for j in outlier_cols:
        x[..., j] = x[..., j].sign() * (20 + 20 * torch.rand(x.shape[:-1]))
    return x.to(dtype).to(device)


def w_deq64(layer):
    return layer.weight.double() * layer.SCB.double().unsqueeze(1) / 127.0


def assert_close_to(y, y_ref):
    """Backends differ only in fp32 epilogue roundings and in rounding the outlier weights
    into x's dtype: a few units of the output dtype's roundoff relative to the output's
    magnitude (absolute, since the outputs mix positive and negative terms)."""
    scale = y_ref.double().abs().max().item()
    atol = 8 * UNIT_ROUNDOFF[y_ref.dtype] * scale
    torch.testing.assert_close(y, y_ref, rtol=0, atol=atol)


# --------------------------------------------------------------------------- construction


def test_constructor_holds_int8_codes_and_fp32_scales():
    layer = Linear8bitLt(40, 24)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (24, 40)
    assert layer.SCB.dtype == torch.float32 and layer.SCB.shape == (24,)
    assert "SCB" in dict(layer.named_buffers())
    assert layer.bias.shape == (24,) and layer.bias.requires_grad
    assert layer.threshold == 6.0
    # nn.Linear's initialization, quantized: |W| <= 1/sqrt(in_features)
    assert w_deq64(layer).abs().max().item() <= 40**-0.5 * (1 + 1e-6)
    assert "threshold=6.0" in repr(layer)
    assert Linear8bitLt(3, 2, bias=False, threshold=0.0).bias is None


def test_is_an_nn_linear_and_reset_parameters_requantizes():
    """An nn.Linear, as bitsandbytes' Linear8bitLt and our Linear4bit are (code that finds a
    model's linear layers by isinstance finds it); reset_parameters re-initializes as
    nn.Linear does and quantizes again, keeping codes and scales consistent."""
    torch.manual_seed(0)
    layer = Linear8bitLt(40, 24)
    assert isinstance(layer, nn.Linear)
    before = layer.weight.clone()
    layer.reset_parameters()
    assert layer.weight.dtype == torch.int8 and not torch.equal(layer.weight, before)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert w_deq64(layer).abs().max().item() <= 40**-0.5 * (1 + 1e-6)
    assert layer.weight.abs().max(dim=1).values.eq(127).all(), "codes fill each row's range"
    x = randn(3, 40)
    expected = LF.int8_linear(x, layer.weight, layer.SCB, layer.bias, layer.threshold)
    assert torch.equal(layer(x), expected)
    assert layer.SCB is dict(layer.named_buffers())["SCB"]


def test_meta_layer_assign_loads_a_float_checkpoint():
    """load_state_dict(assign=True) of an nn.Linear checkpoint into a meta-device layer
    quantizes on the checkpoint's device (the codes had stayed on meta)."""
    source = linear(64, 32)
    with torch.device("meta"):
        layer = Linear8bitLt(64, 32)
    layer.load_state_dict(source.state_dict(), assign=True)
    assert layer.weight.device.type == "cpu" and layer.SCB.device.type == "cpu"
    expected = Linear8bitLt.from_linear(source)
    x = randn(3, 64)
    assert torch.equal(layer(x), expected(x))


def test_constructor_on_meta_then_assign_load():
    src = Linear8bitLt.from_linear(linear(16, 8))
    with torch.device("meta"):
        layer = Linear8bitLt(16, 8)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.int8
    layer.load_state_dict(src.state_dict(), assign=True)
    assert not layer.weight.requires_grad
    x = randn(3, 16)
    assert torch.equal(layer(x), src(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_linear_quantizes_as_given(dtype):
    lin = linear(50, 13, dtype=dtype)
    layer = Linear8bitLt.from_linear(lin, threshold=4.0)
    wq, scale = run_on("reference", LF.int8_quantize_weight, lin.weight.detach())
    assert torch.equal(layer.weight, wq) and torch.equal(layer.SCB, scale)
    # no fp16 rounding first: the scales are the absmax of the weight's own values
    assert torch.equal(layer.SCB, lin.weight.detach().float().abs().amax(1))
    assert layer.threshold == 4.0 and layer.bias.dtype == dtype
    with torch.no_grad():
        lin.bias.add_(1.0)
    assert not torch.equal(layer.bias, lin.bias), "the bias is copied, not shared"


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (17,), (2, 3)])
def test_forward_matches_op_on_every_backend(device_backend, lead, dtype):
    device, backend = device_backend
    layer = Linear8bitLt.from_linear(linear(48, 20, device=device))  # fp32 bias
    x = activations(*lead, 48, dtype=dtype, device=device)
    y = run_on(backend, layer, x)
    assert y.dtype == dtype and y.shape == (*lead, 20), "the output has the input's dtype"
    op = run_on(backend, LF.int8_linear, x, layer.weight, layer.SCB, layer.bias, 6.0)
    assert torch.equal(y, op)
    assert_close_to(y, run_on("reference", layer, x))


def test_train_and_eval_take_the_same_path(device_backend):
    device, backend = device_backend
    layer = Linear8bitLt.from_linear(linear(32, 8, device=device))
    x = activations(5, 32, dtype=torch.float16, device=device)
    y_train = run_on(backend, layer.train(), x)
    y_eval = run_on(backend, layer.eval(), x)
    assert torch.equal(y_train, y_eval)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_to_input_and_bias(device_backend, dtype, threshold):
    device, backend = device_backend
    layer = Linear8bitLt.from_linear(linear(40, 21, dtype=dtype, device=device), threshold)
    x = activations(2, 3, 40, dtype=dtype, device=device).requires_grad_()
    y = run_on(backend, layer, x)
    gy = randn(*y.shape, dtype=dtype, device=device)
    y.backward(gy)
    assert layer.weight.grad is None
    assert x.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    g64, W = gy.double().cpu(), w_deq64(layer).cpu()
    # grad_x = grad_y @ W_deq in x's dtype: W_deq rounded into it (u), the product summed
    # (CPU matmul of fp16/bf16 accumulates in fp32: N * 2**-24 of the sum of magnitudes),
    # the result rounded (u); bound doubled.
    u, N = UNIT_ROUNDOFF[dtype], 21
    bound = 2 * (2 * u + N * 2.0**-24) * (g64.abs() @ W.abs())
    assert bool(((x.grad.cpu().double() - g64 @ W).abs() <= bound).all())
    gb = g64.reshape(-1, N)
    bound = 2 * (u + 6 * 2.0**-24) * gb.abs().sum(0)
    assert bool(((layer.bias.grad.cpu().double() - gb.sum(0)).abs() <= bound).all())


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_mode_ad(device_backend, dtype, threshold):
    """Forward-mode AD (torch.func.jvp, dual tensors): the primal is the plain forward, the
    tangent dx @ W_deq.T + dbias, the linearization the backward formula transposes (LLM.int8
    quantizes x, so the op itself is not linear in x)."""
    device, backend = device_backend
    layer = Linear8bitLt.from_linear(linear(40, 21, dtype=dtype, device=device), threshold)
    x = activations(2, 3, 40, dtype=dtype, device=device)
    tx = randn(2, 3, 40, dtype=dtype, device=device)
    tb = randn(21, dtype=dtype, device=device)
    plain = run_on(backend, layer, x)
    y, tangent = run_on(backend, torch.func.jvp, layer, (x,), (tx,))
    assert torch.equal(y, plain) and tangent.dtype == dtype
    with forward_ad.dual_level(), lpk.use_backend(backend):
        dual = LF.int8_linear(forward_ad.make_dual(x, tx), layer.weight, layer.SCB,
                              forward_ad.make_dual(layer.bias.detach(), tb), threshold)  # fmt: skip
        y_dual, tangent_dual = forward_ad.unpack_dual(dual)
    assert torch.equal(y_dual, plain) and torch.equal(tangent_dual, tangent + tb)
    # tx @ W_deq.T in x's dtype: W_deq rounded into it (u), fp32 accumulation over K
    # (K * 2**-24 of the sum of magnitudes), the result rounded (u); bound doubled.
    t64, W = tx.double().cpu(), w_deq64(layer).cpu()
    u, K = UNIT_ROUNDOFF[dtype], 40
    bound = 2 * (2 * u + K * 2.0**-24) * (t64.abs() @ W.abs().T)
    assert bool(((tangent.cpu().double() - t64 @ W.T).abs() <= bound).all())


def test_backward_keeps_no_activation():
    """The op's autograd keeps the weight's arguments only (see the helper)."""
    assert_backward_keeps_no_activation(Linear8bitLt.from_linear(linear(128, 16)), randn(4, 128))


def test_forward_mode_through_the_op_itself(device_backend):
    """A direct torch.ops call and vmap inside a dual level take the same forward rule."""
    device, backend = device_backend
    layer = Linear8bitLt.from_linear(linear(40, 21, device=device))
    x = activations(3, 40, device=device)
    tx = randn(3, 40, device=device)
    with forward_ad.dual_level(), lpk.use_backend(backend):
        direct = forward_ad.unpack_dual(torch.ops.lowprec.int8_linear(
            forward_ad.make_dual(x, tx), layer.weight, layer.SCB, layer.bias, 6.0))  # fmt: skip
        batched = torch.vmap(layer)(x.unsqueeze(1))
    _, tangent = run_on(backend, torch.func.jvp, layer, (x,), (tx,))
    assert torch.equal(direct.tangent, tangent)
    assert torch.equal(batched.squeeze(1), run_on(backend, layer, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_the_autocast_dtype(device_backend, dtype):
    device, backend = device_backend
    layer = Linear8bitLt.from_linear(linear(32, 12, device=device))
    x = activations(4, 32, device=device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = run_on(backend, layer, x)
    assert y.dtype == dtype
    # as F.linear: only the activation and the bias are cast; the scales stay fp32
    want = run_on(
        backend, LF.int8_linear, x.detach().to(dtype), layer.weight, layer.SCB,
        layer.bias.detach().to(dtype), 6.0,
    )  # fmt: skip
    assert torch.equal(y, want)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


def test_grad_scaler_step():
    layer = Linear8bitLt.from_linear(linear(16, 4))
    opt = torch.optim.SGD([layer.bias], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = activations(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().square().mean()
    scaler.scale(loss).backward()
    assert layer.bias.grad.abs().max() > 1.0, "the gradient arrives scaled"
    bias_before = layer.bias.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(layer.bias, bias_before)
    assert (layer.bias - bias_before).abs().max() < 1.0, "unscaled before the step"


# --------------------------------------------------------------------------- state_dict


def test_state_dict_has_bitsandbytes_keys():
    layer = Linear8bitLt.from_linear(linear(20, 6))
    sd = layer.state_dict()
    assert list(sd) == STATE_DICT_KEYS
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32
    fmt = sd["weight_format"]
    assert fmt.dtype == torch.uint8 and fmt.shape == () and fmt.item() == 0
    prefixed = nn.Sequential(layer).state_dict()
    assert list(prefixed) == [f"0.{k}" for k in STATE_DICT_KEYS]


def test_state_dict_round_trip_strict():
    src = Linear8bitLt.from_linear(linear(20, 6))
    dst = Linear8bitLt(20, 6)
    dst.load_state_dict(src.state_dict(), strict=True)
    for k in ("weight", "SCB", "bias"):
        assert torch.equal(getattr(dst, k), getattr(src, k))
    x = activations(3, 20)
    assert torch.equal(dst(x), src(x))
    # weight_format as bitsandbytes' older string form also loads
    sd = src.state_dict()
    sd["weight_format"] = "row"
    dst.load_state_dict(sd, strict=True)


def test_loads_a_float_linear_checkpoint_by_quantizing_it():
    lin = linear(20, 6)
    layer = Linear8bitLt(20, 6)
    layer.load_state_dict(lin.state_dict(), strict=True)
    want = Linear8bitLt.from_linear(lin)
    assert torch.equal(layer.weight, want.weight) and torch.equal(layer.SCB, want.SCB)
    assert torch.equal(layer.bias, lin.bias)


def test_torch_load_weights_only_and_safetensors():
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    src = Linear8bitLt.from_linear(linear(33, 7))
    x = activations(4, 33)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    from_st = st_load(st_save(src.state_dict()))
    for sd in (loaded, from_st):
        dst = Linear8bitLt(33, 7)
        dst.load_state_dict(sd, strict=True)
        assert torch.equal(dst(x), src(x))


# --------------------------------------------------------------------------- bitsandbytes


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def bnb_layer(bnb, lin, threshold=6.0):
    """bitsandbytes' int8 layer holding ``lin``'s weights, quantized (by `.to`) on the CPU."""
    layer = bnb.nn.Linear8bitLt(
        lin.in_features, lin.out_features, bias=lin.bias is not None,
        has_fp16_weights=False, threshold=threshold,
    )  # fmt: skip
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu").eval()  # eval: its CPU train path is a plain float matmul


def test_bitsandbytes_checkpoint_loads_strictly(bnb):
    lin = linear(64, 24, dtype=torch.float16)
    theirs = bnb_layer(bnb, lin)
    sd = theirs.state_dict()
    assert list(sd) == STATE_DICT_KEYS, "the same keys, in the same order"
    ours = Linear8bitLt(64, 24)
    ours.load_state_dict(sd, strict=True)
    assert torch.equal(ours.weight, sd["weight"]) and torch.equal(ours.SCB, sd["SCB"])
    # An fp16 weight gets the same scales from both (bitsandbytes rounds to fp16 first), and
    # the same codes but at rare exact ties: bitsandbytes' scale 127 / absmax rounds twice
    # (lowprec_kernels/reference/int8.py). None falls in this layer; at most one step apart.
    direct = Linear8bitLt.from_linear(lin)
    assert torch.equal(direct.SCB, sd["SCB"])
    assert int((direct.weight.int() - sd["weight"].int()).abs().max()) <= 1
    # Without outliers both compute the same int8 products; outputs agree to fp16 rounding
    # (bitsandbytes scales by a rounded 1/127**2 constant, we divide by 127 twice).
    x = activations(5, 64, dtype=torch.float16, outlier_cols=())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=4 * 2.0**-11, atol=1e-3)


def test_our_checkpoint_loads_into_bitsandbytes_strictly(bnb):
    lin = linear(64, 24)  # fp32: we quantize it as given, bitsandbytes would round first
    ours = Linear8bitLt.from_linear(lin)
    theirs = bnb_layer(bnb, linear(64, 24))  # a different layer, overwritten by the load
    assert not torch.equal(theirs.weight.SCB, ours.SCB)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    theirs.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert torch.equal(theirs.weight.data, ours.weight)
    assert torch.equal(theirs.weight.SCB, ours.SCB)
    x = activations(5, 64, dtype=torch.float16, outlier_cols=())
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=4 * 2.0**-11, atol=1e-3)


def test_fp32_weights_are_not_rounded_to_fp16_first(bnb):
    lin = linear(64, 24)
    ours = Linear8bitLt.from_linear(lin)
    theirs = bnb_layer(bnb, lin)
    exact = lin.weight.detach().abs().amax(1)
    assert torch.equal(ours.SCB, exact)
    assert torch.equal(theirs.weight.SCB, exact.half().float()), "theirs: fp16 absmax"
    assert not torch.equal(theirs.weight.SCB, exact)


def test_outputs_near_bitsandbytes_with_outliers(bnb):
    # With outliers the two differ by design (our row absmax skips whole outlier columns,
    # theirs only the outlier elements): both stay near the float64 product.
    lin = linear(64, 24, dtype=torch.float16)
    ours, theirs = Linear8bitLt.from_linear(lin), bnb_layer(bnb, lin)
    x = activations(9, 64, dtype=torch.float16, outlier_cols=(3, 50))
    y64 = x.double() @ w_deq64(ours).T + lin.bias.double()
    with torch.no_grad():
        err_ours = (ours(x).double() - y64).norm()
        err_theirs = (theirs(x).double() - y64).norm()
    assert err_ours < 2 * err_theirs and err_theirs < 2 * err_ours


# --------------------------------------------------------------------------- moves and copies


def test_dtype_moves_keep_codes_and_fp32_scales():
    layer = Linear8bitLt.from_linear(linear(24, 10))
    weight, scb = layer.weight.clone(), layer.SCB.clone()
    for move, bias_dtype in (
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to("cpu", torch.float32), torch.float32),
        (lambda m: m.float(), torch.float32),
    ):
        assert move(layer) is layer
        assert torch.equal(layer.weight, weight) and torch.equal(layer.SCB, scb)
        assert layer.SCB.dtype == torch.float32 and layer.bias.dtype == bias_dtype
        assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    x = activations(3, 24, dtype=torch.float16)
    assert layer.half()(x).dtype == torch.float16


def test_device_move(device):
    layer = Linear8bitLt.from_linear(linear(24, 10)).to(device)
    assert layer.weight.device.type == device and layer.SCB.device.type == device
    assert layer.SCB.dtype == torch.float32
    assert layer(activations(2, 24, device=device)).device.type == device


def test_deepcopy_and_pickle_keep_it_quantized():
    layer = Linear8bitLt.from_linear(linear(24, 10), threshold=5.0)
    x = activations(3, 24)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.weight.dtype == torch.int8 and not clone.weight.requires_grad
        assert clone.SCB.dtype == torch.float32 and clone.threshold == 5.0
        assert clone.weight.data_ptr() != layer.weight.data_ptr()
        assert torch.equal(clone(x), layer(x))


# --------------------------------------------------------------------------- torch.compile


def _model(threshold=6.0):
    return nn.Sequential(
        Linear8bitLt.from_linear(linear(32, 48), threshold),
        nn.ReLU(),
        Linear8bitLt.from_linear(linear(48, 16), threshold),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph_with_and_without_outliers(backend):
    if not lpk.available_backends()[backend]:
        pytest.skip(f"backend {backend} not available")
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, fullgraph=True)
    without = activations(5, 32, outlier_cols=())
    with_outliers = activations(5, 32, outlier_cols=(2, 30))
    with lpk.use_backend(backend):
        assert torch.equal(compiled(without), model(without))
        # The outlier count lives inside the op: new data with outliers must not recompile.
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(compiled(with_outliers), model(with_outliers))


def test_torch_export(tmp_path):
    """torch.export traces the layer with a dynamic batch (outlier columns are found at run
    time); the saved program loads and computes the same output."""
    torch.manual_seed(0)
    model = nn.Sequential(Linear8bitLt(64, 40), nn.ReLU(), Linear8bitLt(40, 9, bias=False))

    def with_outlier_column(rows):
        x = torch.randn(rows, 64)
        x[:, 5 + rows] = -30.0
        return x

    assert_export_round_trip(model, with_outlier_column, "int8_linear", tmp_path)


def test_compile_vectorwise_quant_unbacked_outlier_count():
    # The decomposed path, traced: the number of outlier columns is an unbacked size in the
    # graph (the op's fake), and one graph serves inputs with and without outliers.
    torch._dynamo.reset()
    layer = Linear8bitLt.from_linear(linear(32, 8, bias=False))

    def decomposed(x, wq, w_scale):
        xq, row_stats, cols = LF.int8_vectorwise_quant(x, 6.0)
        y = LF.int8_scaled_mm(xq, row_stats, wq, w_scale, None, x.dtype)
        w_out = (wq.index_select(1, cols).float() * (w_scale.unsqueeze(1) / 127)).to(x.dtype)
        return y + x.index_select(1, cols) @ w_out.T, cols

    compiled = torch.compile(decomposed, fullgraph=True, backend="aot_eager")
    args = (layer.weight, layer.SCB)
    x0 = activations(4, 32, outlier_cols=())
    y0, cols0 = compiled(x0, *args)
    assert cols0.numel() == 0
    x3 = activations(4, 32, outlier_cols=(1, 7, 20))
    with torch._dynamo.config.patch(error_on_recompile=True):
        y3, cols3 = compiled(x3, *args)
    assert cols3.tolist() == [1, 7, 20]
    for x, y in ((x0, y0), (x3, y3)):
        assert torch.equal(y, decomposed(x, *args)[0])
        torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(4, 3, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt.from_linear(linear(4, 3), threshold=float("nan"))
    layer = Linear8bitLt(4, 3)
    layer.threshold = -0.5
    with pytest.raises(ValueError, match="threshold"):
        layer(randn(2, 4))


def test_bad_activations():
    layer = Linear8bitLt(4, 3)
    with pytest.raises(TypeError, match=r"\bx\b"):
        layer(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\bx\b.*in_features=4"):
        layer(randn(2, 5))


def test_bad_weights():
    with pytest.raises(ValueError, match=r"\bW\b.*2-D"):
        Linear8bitLt.from_linear(types.SimpleNamespace(weight=randn(2, 3, 4), bias=None))
    wq, scb = LF.int8_quantize_weight(randn(5, 6))
    with pytest.raises(TypeError, match="from_quantized"):
        Linear8bitLt.from_linear(types.SimpleNamespace(weight=wq, bias=None))
    with pytest.raises(ValueError, match="SCB"):
        Linear8bitLt.from_quantized(wq, None)
    with pytest.raises(TypeError, match=r"\bweight\b"):
        Linear8bitLt.from_quantized(wq.tolist(), scb)
    with pytest.raises(ValueError, match="weight_scale"):
        Linear8bitLt.from_quantized(wq, scb[:4])
    with pytest.raises(TypeError, match="weight_scale"):
        Linear8bitLt.from_quantized(wq, scb.half())
    with pytest.raises(ValueError, match=r"\bweight\b.*2-D"):
        Linear8bitLt.from_quantized(wq.view(-1), scb)
    with pytest.raises(ValueError, match="bias"):
        Linear8bitLt.from_quantized(wq, scb, randn(4))
    layer = Linear8bitLt.from_quantized(wq, scb, randn(5))
    x = randn(2, 6)
    assert torch.equal(layer(x), LF.int8_linear(x, wq, scb, layer.bias))


@pytest.mark.parametrize("strict", [True, False])
def test_bad_state_dicts(strict):
    sd = Linear8bitLt.from_linear(linear(6, 5)).state_dict()
    layer = Linear8bitLt(6, 5)

    before = {k: v.clone() for k, v in layer.state_dict().items()}

    def load(**changes):
        bad = {**sd, **changes}
        bad = {k: v for k, v in bad.items() if v is not None}
        try:
            layer.load_state_dict(bad, strict=strict)
        finally:  # a rejected checkpoint changes nothing
            after = layer.state_dict()
            assert all(torch.equal(after[k], v) for k, v in before.items())

    # an int8 weight without its scales is never loaded, even with strict=False
    with pytest.raises(RuntimeError, match="SCB.*missing"):
        load(SCB=None)
    with pytest.raises(RuntimeError, match="SCB"):
        load(SCB=torch.ones(4))  # wrong length
    with pytest.raises(RuntimeError, match="weight"):
        load(weight=sd["weight"][:, :4])  # wrong shape
    with pytest.raises(RuntimeError, match="weight"):
        load(weight=sd["weight"].to(torch.uint8))
    with pytest.raises(RuntimeError, match=r"weight.*2-D"):
        load(weight=randn(5, 6, 1), SCB=None)
    with pytest.raises(RuntimeError, match="SCB is given too"):
        load(weight=randn(5, 6))
    with pytest.raises(RuntimeError, match="weight_format"):
        load(weight_format=torch.tensor(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="SCB is given without weight"):
        load(weight=None)


def test_bitsandbytes_inference_keyword_carries_over():
    """bitsandbytes' inference layer is ``Linear8bitLt(..., has_fp16_weights=False)``: the
    argument is accepted; its True (a trainable 16-bit weight) is refused by name."""
    layer = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    assert layer.weight.dtype == torch.int8
    with pytest.raises(ValueError, match="has_fp16_weights must be False"):
        Linear8bitLt(64, 32, has_fp16_weights=True)


@pytest.mark.parametrize("threshold", ["6", None, [6.0]])
def test_a_threshold_that_is_no_number_is_refused_by_name(threshold):
    with pytest.raises(TypeError, match="threshold must be a number"):
        Linear8bitLt(64, 32, threshold=threshold)
    wq, scale = LF.int8_quantize_weight(torch.randn(32, 64))
    with pytest.raises(TypeError, match="int8_linear: threshold must be a number"):
        LF.int8_linear(torch.randn(2, 64), wq, scale, threshold=threshold)
    with pytest.raises(TypeError, match="int8_vectorwise_quant: threshold must be a number"):
        LF.int8_vectorwise_quant(torch.randn(2, 64), threshold=threshold)


def test_an_assigned_half_scb_is_loaded_as_float32():
    """``load_state_dict(assign=True)`` takes the checkpoint's tensors as they are; an SCB
    in 16 bits (fp32 in every bitsandbytes checkpoint) is cast instead of failing at the first
    forward, and a non-float one is refused at load."""
    torch.manual_seed(0)
    src = Linear8bitLt(64, 32)
    x = torch.randn(3, 64)
    state = src.state_dict()
    dst = Linear8bitLt(64, 32)
    dst.load_state_dict({**state, "SCB": state["SCB"].half()}, assign=True)
    assert dst.SCB.dtype == torch.float32
    assert torch.equal(dst(x), Linear8bitLt.from_quantized(
        src.weight, src.SCB.half().float(), src.bias)(x))  # fmt: skip
    with pytest.raises(RuntimeError, match="SCB must be floating point"):
        Linear8bitLt(64, 32).load_state_dict({**state, "SCB": state["SCB"].int()}, assign=True)


def test_a_layer_without_weight_elements_is_refused_by_its_features():
    with pytest.raises(ValueError, match=r"Linear8bitLt: in_features and out_features must be "
                                         r"positive .* out_features=0"):  # fmt: skip
        Linear8bitLt(64, 0)
    with pytest.raises(ValueError, match=r"from_linear: .* in_features=0"):
        Linear8bitLt.from_linear(nn.Linear(0, 8))

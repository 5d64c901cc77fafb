"""``lpk.nn.quantize_model``: which layers are swapped, with which settings, and the outputs.

The NF4 / FP4 methods (``Linear4bit``); the int8 method is tested with ``Linear8bitLt``.
"""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import lowprec_kernels as lpk
from lowprec_kernels.nn import Linear4bit, quantize_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 70), nn.GELU())
        self.odd = nn.Linear(70, 50)  # in_features 70: not a multiple of any blocksize
        self.lm_head = nn.Linear(50, 10)

    def forward(self, x):
        return self.lm_head(torch.relu(self.odd(self.layers(x))))


class Model(nn.Module):
    """``model.lm_head`` is the head's full name, as in Hugging Face causal LMs."""

    def __init__(self):
        super().__init__()
        self.model = Block()
        self.norm = nn.LayerNorm(10)

    def forward(self, x):
        return self.norm(self.model(x))


LINEAR_NAMES = ["model.layers.0", "model.layers.2", "model.odd", "model.lm_head"]


def linear_types(model):
    return {name: type(model.get_submodule(name)) for name in LINEAR_NAMES}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Model()


def dequantized_copy(quantized: nn.Module, original: nn.Module) -> nn.Module:
    """``original`` with every quantized layer's weight replaced by its decoded weight."""
    float_model = copy.deepcopy(original)
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            target = float_model.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(module.weight.dequantize(torch.float32))
    return float_model


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_quantizes_every_linear_but_the_skipped(model, method):
    original = copy.deepcopy(model)
    returned = quantize_model(model, method=method)
    assert returned is model, "in place, and returned"
    assert linear_types(model) == {
        "model.layers.0": Linear4bit,
        "model.layers.2": Linear4bit,
        "model.odd": Linear4bit,
        "model.lm_head": nn.Linear,  # skip=("lm_head",) matches the last component
    }
    assert all(m.quant_type == method for m in model.modules() if isinstance(m, Linear4bit))
    odd = model.model.odd
    assert odd.quant_state.shape == (50, 70) and 70 % odd.blocksize != 0
    # Each layer is from_linear of the original: the model is exactly the float model with
    # the decoded weights (same ops on the same values; the 4-bit matmul accumulates in
    # float64 on the reference backend and rounds once, torch's fp32 matmul does not).
    x = torch.randn(4, 64)
    y = model(x)
    torch.testing.assert_close(y, dequantized_copy(model, original)(x), rtol=1e-5, atol=1e-5)
    # Close to the float model: 4-bit weights move each output by a few percent of its
    # scale. The LayerNorm output has unit scale; the bound is loose on purpose (NF4's
    # relative weight error is ~0.1 at worst, FP4's coarser).
    err = (y - original(x)).norm() / original(x).norm()
    assert err < (0.15 if method == "nf4" else 0.3), err


@pytest.mark.parametrize(
    "skip, kept",
    [
        (("lm_head",), {"model.lm_head"}),
        ("odd", {"model.odd"}),  # a single string
        (("model.layers.0", "lm_head"), {"model.layers.0", "model.lm_head"}),  # a full name
        (("layers.2",), {"model.layers.2"}),  # the last two components
        ((), set()),
    ],
)
def test_skip_matching(model, skip, kept):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry keeps a Linear float: no warning
        quantize_model(model, "nf4", skip=skip)
    types = linear_types(model)
    assert {name for name, t in types.items() if t is nn.Linear} == kept
    assert all(t is Linear4bit for name, t in types.items() if name not in kept)


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("head", "matches no module"),  # part of a name component never matches
        ("lm_haed", "matches no module"),
        ("layers", "matches 'model.layers', a Sequential, not an nn.Linear"),  # a parent
        ("norm", "matches 'norm', a LayerNorm, not an nn.Linear"),
    ],
)
def test_skip_entries_that_keep_no_linear_are_warned_about(model, entry, reason):
    """An entry that keeps no Linear float is a typo, or a parent's name, which does not
    cover the Linears inside it: both were silent."""
    with pytest.warns(UserWarning, match=re.escape(f"skip entry {entry!r} {reason}")):
        quantize_model(model, "nf4", skip=("lm_head", entry))
    types = linear_types(model)
    assert {name for name, t in types.items() if t is nn.Linear} == {"model.lm_head"}


def test_default_skip_is_silent_without_an_lm_head():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(nn.Sequential(nn.Linear(8, 8)), "nf4")


def test_layer_kwargs_are_forwarded(model):
    quantize_model(model, "fp4", blocksize=32, double_quant=False, compute_dtype=torch.float16)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 3
    for layer in layers:
        assert (layer.quant_type, layer.blocksize, layer.double_quant) == ("fp4", 32, False)
        assert layer.compute_dtype == torch.float16
    assert model(torch.randn(2, 64)).dtype == torch.float32  # compute fp16, output as input


def test_model_at_the_top_level_and_idempotent():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize_model(seq, "nf4", skip=())
    assert isinstance(seq[0], Linear4bit) and isinstance(seq[2], Linear4bit)
    first = seq[0]
    quantize_model(seq, "nf4", skip=())  # already quantized layers are left as they are
    assert seq[0] is first


def test_quantized_model_state_dict_round_trip(model):
    quantize_model(model, "nf4")
    fresh = quantize_model(Model(), "nf4", blocksize=128)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_a_lone_linear_is_refused():
    with pytest.raises(ValueError, match="from_linear"):
        quantize_model(nn.Linear(8, 8))


def test_bad_method(model):
    with pytest.raises(ValueError, match="method"):
        quantize_model(model, method="int4")


def test_reachable_from_the_package():
    assert lpk.nn.quantize_model is quantize_model and lpk.nn.Linear4bit is Linear4bit


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_sharing_is_kept(method):
    """A Linear used twice becomes one quantized layer used twice; two Linears sharing a
    weight share its quantized form (one copy of the codes, as before one float weight)."""
    torch.manual_seed(0)
    reused = nn.Linear(64, 64)
    model = nn.Sequential(reused, nn.ReLU(), reused)
    x = torch.randn(3, 64)
    quantize_model(model, method=method)
    assert type(model[0]) is not nn.Linear and model[0] is model[2]
    first, second = nn.Linear(64, 64), nn.Linear(64, 64)
    second.weight = first.weight
    tied = quantize_model(nn.Sequential(first, nn.ReLU(), second), method=method)
    assert tied[0].weight is tied[2].weight and tied[0].bias is not tied[2].bias
    if method == "int8":
        assert tied[0].SCB is tied[2].SCB
    assert torch.isfinite(tied(x)).all() and torch.isfinite(model(x)).all()


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_linears_sharing_a_weight_stay_float_if_any_is_skipped(method):
    """As for a reused Linear: skipping one of two Linears that share a weight keeps both
    float, the weight still shared (quantizing the other one untied them)."""
    first, second, other = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second, other)
    quantize_model(model, method=method, skip=["0"])
    assert model[0] is first and model[2] is second and first.weight is second.weight
    assert type(model[3]) is not nn.Linear


def test_a_reused_linear_stays_float_if_any_of_its_names_is_skipped():
    shared = nn.Linear(32, 32)
    model = nn.Module()
    model.body = nn.Sequential(shared)
    model.lm_head = shared
    quantize_model(model)
    assert model.body[0] is shared and model.lm_head is shared


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_hooks_and_training_flag_are_kept(method):
    """The quantized layer runs the Linear's forward, pre-forward and backward hooks, their
    handles still remove them, and it keeps the Linear's training flag."""
    model = Model().eval()
    linear = model.model.odd
    seen = []
    handles = [
        linear.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m)))),
        linear.register_forward_hook(lambda m, args, out: seen.append(("post", out.shape))),
        linear.register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", None))),
    ]
    quantize_model(model, method)
    layer = model.model.odd
    assert type(layer) is not nn.Linear and not layer.training
    assert all(not m.training for m in model.modules())
    x = torch.randn(4, 64, requires_grad=True)
    model(x).sum().backward()
    assert seen == [("pre", type(layer)), ("post", (4, 50)), ("backward", None)]
    for handle in handles:
        handle.remove()
    seen.clear()
    model(x).sum().backward()
    assert seen == []


def test_pruned_linear_is_quantized_with_its_pruned_weight():
    """A pruned Linear's current (masked) weight is quantized; the pruning hook, which would
    overwrite the quantized weight, stays behind on the original Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    linear = model[0]
    torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.5)
    pruned = linear.weight.detach().clone()
    hooks_before = dict(linear._forward_pre_hooks)
    quantize_model(model, "nf4", skip=())
    assert dict(linear._forward_pre_hooks) == hooks_before, "the original Linear is untouched"
    assert not model[0]._forward_pre_hooks
    # The user's own pre-hooks come along (copied: their handles act on `linear` only)
    seen = []
    pre = linear.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    model2 = nn.Sequential(linear)
    quantize_model(model2, "nf4", skip=())
    model2(torch.randn(2, 64))
    assert seen == ["pre"]
    pre.remove()
    model2(torch.randn(2, 64))
    assert seen == ["pre", "pre"], "the copied hook stays on the quantized layer"
    x = torch.randn(3, 64)
    expected = Linear4bit.from_linear(nn.Linear(64, 32).requires_grad_(False))
    expected.weight = lpk.nn.Params4bit.from_weight(pruned)
    expected.bias = model[0].bias
    assert torch.equal(model(x), expected(x))


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("checkpoint", ["quantized", "float"])
def test_quantized_in_a_meta_device_context_then_loaded(method, checkpoint):
    """Model, quantization and to_empty without a float copy in memory: a quantized or a
    float checkpoint then loads, and the model computes as one quantized from the start."""
    torch.manual_seed(0)
    source = Model()
    expected = quantize_model(copy.deepcopy(source), method=method)
    with torch.device("meta"):
        model = quantize_model(Model(), method=method)
    model.to_empty(device="cpu")
    model.load_state_dict((expected if checkpoint == "quantized" else source).state_dict())
    x = torch.randn(5, 64)
    assert torch.equal(model(x), expected(x))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_transformer_encoder_in_eval_without_grad(method):
    """nn.TransformerEncoderLayer's fused inference path (eval, no grad) reads linear1/2's
    weights directly; quantized, the model must still call the quantized layers."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()  # nested tensors on, as by default
    x = torch.randn(2, 5, 64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        want = model(x, src_key_padding_mask=padding)
    quantize_model(model, method=method)
    assert type(model.layers[0].linear1) is not nn.Linear
    with torch.no_grad():
        got = model(x, src_key_padding_mask=padding)
    # As with gradients on (where attention's own fused path is off: last bits differ).
    torch.testing.assert_close(got, model(x, src_key_padding_mask=padding), rtol=1e-4, atol=1e-4)
    kept = ~padding  # the padded positions' outputs are not defined alike on both paths
    assert (got - want)[kept].abs().mean() < 0.1  # quantization error (outputs normalized)


def test_a_linear_that_cannot_be_quantized_leaves_the_model_unchanged():
    """Every quantized layer is built before any is put in place; the error names the
    Linear."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8).double())
    with pytest.raises(TypeError, match=r"cannot quantize '2' \(32 -> 8, torch.float64\)"):
        quantize_model(seq, "nf4")
    assert [type(m) for m in seq] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(TypeError, match="cannot quantize '0' .*unexpected keyword"):
        quantize_model(seq, "nf4", no_such_option=1)
    assert type(seq[0]) is nn.Linear


@pytest.mark.parametrize("skip", [None, 3, ["lm_head", 3]])
def test_a_skip_that_is_no_name_is_refused(skip):
    with pytest.raises(TypeError, match="skip must be a module name or an iterable of names") as e:
        quantize_model(nn.Sequential(nn.Linear(8, 8)), "nf4", skip=skip)
    assert str(e.value).endswith(f"got {skip!r}")  # the value given, whatever its type


def test_bitsandbytes_layer_keywords_pass_through():
    """quantize_model's keywords go to the layers' from_linear, which takes bitsandbytes'
    names as the constructors do."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_model(seq, "nf4", skip=(), compress_statistics=False, quant_storage=torch.uint8)
    assert seq[0].double_quant is False and seq[2].double_quant is False
    seq = nn.Sequential(nn.Linear(64, 32))
    quantize_model(seq, "int8", skip=(), has_fp16_weights=False)
    assert isinstance(seq[0], lpk.nn.Linear8bitLt)
    with pytest.raises(ValueError, match="from_linear: has_fp16_weights must be False"):
        quantize_model(nn.Sequential(nn.Linear(64, 32)), "int8", has_fp16_weights=True)

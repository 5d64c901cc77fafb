"""``quantize_model(model, method="int8")``: which layers are swapped, what they receive,
and that the quantized model still computes (nearly) what it did."""

import copy

import pytest
import torch
from torch import nn

import lowprec_kernels as lpk
from lowprec_kernels.nn import Linear8bitLt, quantize_model


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(torch.relu(self.up(x))))


class TinyModel(nn.Module):
    def __init__(self, d=24, vocab=40):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.head(h))


LINEARS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head.0", "lm_head"]


def _kinds(model):
    return {name: type(m) for name, m in model.named_modules() if name in LINEARS}


def test_swaps_every_linear_but_lm_head_and_returns_the_model():
    model = TinyModel()
    original = copy.deepcopy(model)
    out = quantize_model(model, method="int8")
    assert out is model
    kinds = _kinds(model)
    assert kinds.pop("lm_head") is nn.Linear, "skipped by default"
    assert set(kinds.values()) == {Linear8bitLt}
    assert isinstance(model.blocks[0].norm, nn.LayerNorm) and isinstance(model.embed, nn.Embedding)
    assert model.blocks[0].down.bias is None and model.blocks[0].up.bias is not None
    # each layer holds its own original weight, quantized as given
    for name in kinds:
        layer, lin = model.get_submodule(name), original.get_submodule(name)
        want = Linear8bitLt.from_linear(lin)
        assert torch.equal(layer.weight, want.weight) and torch.equal(layer.SCB, want.SCB)
        assert layer.threshold == 6.0


def test_outputs_close_to_the_float_model():
    model = TinyModel()
    original = copy.deepcopy(model)
    quantize_model(model, method="int8")
    tokens = torch.randint(0, 40, (3, 7))
    with torch.no_grad():
        y, y_ref = model(tokens), original(tokens)
    # int8 weights and activations: about 1% relative error per layer, through four
    # quantized layers and the LayerNorms.
    rel = (y - y_ref).norm() / y_ref.norm()
    assert rel < 0.03, rel.item()


def test_kwargs_reach_the_layers():
    model = quantize_model(TinyModel(), method="int8", threshold=3.5)
    thresholds = {m.threshold for m in model.modules() if isinstance(m, Linear8bitLt)}
    assert thresholds == {3.5}


@pytest.mark.parametrize(
    ("skip", "kept"),
    [
        ((), set()),
        ("up", {"blocks.0.up", "blocks.1.up"}),  # last component, in every block
        (("blocks.1.down", "head.0"), {"blocks.1.down", "head.0"}),  # full names
        (("1.down",), {"blocks.1.down"}),  # last components
        (("locks.0.up",), set()),  # a partial component matches nothing
    ],
)
def test_skip_matching(skip, kept):
    model = quantize_model(TinyModel(), method="int8", skip=skip)
    kinds = _kinds(model)
    assert {n for n, k in kinds.items() if k is nn.Linear} == kept
    assert {n for n, k in kinds.items() if k is Linear8bitLt} == set(LINEARS) - kept


def test_quantized_model_state_dict_round_trip():
    model = quantize_model(TinyModel(), method="int8")
    fresh = quantize_model(TinyModel(), method="int8")
    fresh.load_state_dict(model.state_dict(), strict=True)
    tokens = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        quantize_model(TinyModel(), method="int4")
    with pytest.raises(ValueError, match="threshold"):
        quantize_model(TinyModel(), method="int8", threshold=-1.0)
    assert lpk.nn.quantize_model is quantize_model

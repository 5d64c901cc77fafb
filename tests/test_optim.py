"""``lpk.optim.Adam8bit`` / ``AdamW8bit``: the update, state, checkpoints, torch integration.

The optimizer runs whatever backend the op dispatches to (``cpu`` or ``reference`` here,
``triton`` forced where stated); the per-element definition is pinned by the op tests, so
these tests check what the optimizer adds: which tensors take which path, parameter
groups, skipping, checkpoints, AMP, schedulers, torch.compile, and training quality.
"""

import io
import math
import re

import pytest
import torch
from conftest import run_on, spy_on_router
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import lowprec_kernels as lpk
from lowprec_kernels import functional as LF
from lowprec_kernels.optim import Adam8bit, AdamW8bit
from lowprec_kernels.reference.adam8bit import adam_update

B1, B2, EPS = 0.9, 0.999, 1e-8


def mlp(seed=0, dtype=torch.float32, hidden=128):
    """32 -> hidden -> hidden -> 1: two 8-bit weights (>= 4096 elements) and fp32-state
    biases and output layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, 1),
    )  # fmt: skip
    return model.to(dtype)


def regression_data(n=512, seed=1, dtype=torch.float32, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 1, generator=g) / math.sqrt(32)
    y = torch.sin(2 * x @ w) + 0.1 * x[:, :1] ** 2 + noise * torch.randn(n, 1, generator=g)
    return x.to(dtype), y.to(dtype)


def loss_fn(model, x, y):
    return ((model(x).float() - y.float()) ** 2).mean()


def train(model, opt, x, y, steps, scheduler=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"parameter {i} differs: max {(x - y).abs().max().item()}"


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(betas=(1.0, 0.999)), "betas[0]"),
        (dict(betas=(0.9, -0.1)), "betas[1]"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(blocksize=100), "blocksize"),
        (dict(min_8bit_size=-1), "min_8bit_size"),
    ],
)
@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
def test_bad_hyperparameters_raise_value_error(cls, kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name}=")):
        cls([nn.Parameter(torch.randn(10))], **kwargs)


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
def test_zero_eps_is_accepted_and_steps(cls):
    """As torch.optim.Adam: eps = 0 is valid (only a negative one is refused)."""
    p = nn.Parameter(torch.randn(5000))
    opt = cls([p], eps=0.0)
    p.grad = torch.randn(5000)
    opt.step()
    assert torch.isfinite(p).all()


def test_bad_hyperparameters_of_a_param_group():
    good, bad = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="lr="):
        AdamW8bit([{"params": [good]}, {"params": [bad], "lr": -1.0}])
    opt = AdamW8bit([good])
    with pytest.raises(ValueError, match="weight_decay="):
        opt.add_param_group({"params": [bad], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1
    # torch.optim.Adam's update-changing options, as a copied group may carry them: refused
    # when set (silently minimizing would be worse), accepted when off.
    for option in ("maximize", "amsgrad", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{option}=True"):
            opt.add_param_group({"params": [bad], option: True})
    with pytest.raises(ValueError, match="decoupled_weight_decay='yes'"):
        opt.add_param_group({"params": [bad], "decoupled_weight_decay": "yes"})
    opt.add_param_group({"params": [bad], "maximize": False, "amsgrad": False, "foreach": None})


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
def test_torch_adam_keywords_carry_over(cls):
    """torch.optim.Adam's keywords are accepted where they ask for nothing these optimizers
    lack (foreach and fused only pick torch's implementation) and refused by name where
    they do: torch's arguments carry over without silently changing the update."""
    p = nn.Parameter(torch.randn(10))
    cls([p], amsgrad=False, maximize=False, capturable=False, differentiable=False,
        foreach=True, fused=False)  # fmt: skip
    for option in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{option}=True"):
            cls([p], **{option: True})


def _stepped_copies(n, make_optimizers, steps=3, weight_decay=0.5):
    """Parameters stepped by each of ``make_optimizers`` (callables of (params, wd)) from the
    same values and gradients."""
    torch.manual_seed(0)
    start = torch.randn(n)
    grads = [torch.randn(n) for _ in range(steps)]
    results = []
    for make in make_optimizers:
        p = nn.Parameter(start.clone())
        opt = make([p], weight_decay)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    return results


@pytest.mark.parametrize("n", [100, 5000], ids=["fp32-state", "8bit-state"])
def test_decoupled_weight_decay_per_group_as_torch(n):
    """As torch.optim.Adam: ``decoupled_weight_decay`` (a keyword of Adam8bit, a key of any
    param group) makes Adam decay as AdamW does, and a group of AdamW8bit setting it False
    adds the decay to the gradient as Adam does; bit for bit the other class's step."""
    adam, adamw, adam_decoupled, adam_group, adamw_group = _stepped_copies(n, [
        lambda ps, wd: Adam8bit(ps, weight_decay=wd),
        lambda ps, wd: AdamW8bit(ps, weight_decay=wd),
        lambda ps, wd: Adam8bit(ps, weight_decay=wd, decoupled_weight_decay=True),
        lambda ps, wd: Adam8bit([{"params": ps, "decoupled_weight_decay": True}],
                                weight_decay=wd),
        lambda ps, wd: AdamW8bit([{"params": ps, "decoupled_weight_decay": False}],
                                 weight_decay=wd),
    ])  # fmt: skip
    assert not torch.equal(adam, adamw)
    assert torch.equal(adam_decoupled, adamw)
    assert torch.equal(adam_group, adamw)
    assert torch.equal(adamw_group, adam)
    assert AdamW8bit([nn.Parameter(torch.randn(3))]).param_groups[0]["decoupled_weight_decay"]
    if n < 4096:  # float32 states: torch's own Adam with the same flag, to rounding
        (torch_decoupled,) = _stepped_copies(n, [
            lambda ps, wd: torch.optim.Adam(ps, weight_decay=wd, decoupled_weight_decay=True)
        ])  # fmt: skip
        torch.testing.assert_close(adam_decoupled, torch_decoupled, rtol=1e-6, atol=1e-6)


def test_load_state_dict_refuses_modes_it_lacks():
    """A torch.optim.AdamW state dict asking for maximize is refused (it would step the wrong
    way), the optimizer left as it was; its other torch keys load."""
    p = nn.Parameter(torch.randn(10))
    opt = AdamW8bit([p], lr=0.1)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for option in ("maximize", "amsgrad", "capturable", "differentiable"):
        saved = torch.optim.AdamW([nn.Parameter(torch.randn(10))], lr=0.5, **{option: True})
        with pytest.raises(ValueError, match=f"loaded state dict .*{option}=True"):
            opt.load_state_dict(saved.state_dict())
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == (
            groups_before
        )
    opt.load_state_dict(torch.optim.AdamW([nn.Parameter(torch.randn(10))], lr=0.5).state_dict())
    assert opt.param_groups[0]["lr"] == 0.5


def test_an_empty_state_entry_loads_as_no_state():
    """Looking up ``opt.state[p]`` for a parameter without state records an empty dict (a
    defaultdict, as in torch): its state_dict still loads, as torch's does; and a parameter
    refused on its first step leaves no such entry."""
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(10))
    opt = AdamW8bit([a, b])
    a.grad = torch.randn(5000)
    opt.step()
    assert "step" not in opt.state[b]  # records {} for b
    opt.load_state_dict(opt.state_dict())
    assert len(opt.state[a]) > 0
    b.grad = torch.randn(10)
    opt.step()
    assert opt.state[b]["step"].item() == 1
    c = nn.Parameter(torch.randn(10, dtype=torch.float64))
    c.grad = torch.randn(10, dtype=torch.float64)
    refusing = AdamW8bit([c])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        refusing.step()
    assert len(refusing.state) == 0


def test_defaults():
    p = [nn.Parameter(torch.randn(10))]
    assert AdamW8bit(p).defaults["weight_decay"] == 1e-2
    assert Adam8bit(p).defaults["weight_decay"] == 0.0
    for cls in (Adam8bit, AdamW8bit):
        d = cls(p).defaults
        assert (d["lr"], d["betas"], d["eps"], d["blocksize"], d["min_8bit_size"]) == (
            1e-3, (0.9, 0.999), 1e-8, 256, 4096
        )  # fmt: skip
    assert lpk.optim.AdamW8bit is AdamW8bit


# ---------------------------------------------------------------- state


def test_state_names_dtypes_and_the_8bit_threshold():
    big = nn.Parameter(torch.randn(64, 64))  # exactly min_8bit_size: 8-bit
    small = nn.Parameter(torch.randn(4095))  # one below: float32 state
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    s = opt.state[big]
    assert set(s) == {"step", "skipped", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
    assert s["state1"].dtype == s["state2"].dtype == torch.uint8
    assert s["state1"].shape == s["state2"].shape == big.shape
    assert s["absmax1"].dtype == s["absmax2"].dtype == torch.float32
    assert s["absmax1"].shape == s["absmax2"].shape == (4096 // 256,)
    assert torch.equal(s["qmap1"], LF.dynamic_map(True))
    assert torch.equal(s["qmap2"], LF.dynamic_map(False))
    assert s["step"].dtype == s["skipped"].dtype == torch.float32 and s["step"].dim() == 0
    assert (s["step"].item(), s["skipped"].item()) == (1.0, 0.0)
    s = opt.state[small]
    assert set(s) == {"step", "skipped", "state1", "state2"}
    assert s["state1"].dtype == s["state2"].dtype == torch.float32
    assert s["state1"].shape == small.shape


def test_min_8bit_size_and_blocksize_per_group():
    a, b = nn.Parameter(torch.randn(1000)), nn.Parameter(torch.randn(1000))
    opt = Adam8bit([{"params": [a], "min_8bit_size": 1000, "blocksize": 64}, {"params": [b]}])
    a.grad, b.grad = torch.randn(1000), torch.randn(1000)
    opt.step()
    assert opt.state[a]["state1"].dtype == torch.uint8 and opt.state[a]["absmax1"].numel() == 16
    assert opt.state[b]["state1"].dtype == torch.float32


# ---------------------------------------------------------------- the update


def manual_8bit_step(p, g, st, lr, wd, decoupled, blocksize=256):
    """The op, by hand, on copies of the optimizer's tensors."""
    run_on(
        "reference", torch.ops.lowprec.adam8bit_step_,
        p, g, st["state1"], st["state2"], st["absmax1"], st["absmax2"], st["qmap1"],
        st["qmap2"], st["step"], st["skipped"], lr, B1, B2, EPS, wd, decoupled, 1.0, blocksize,
    )  # fmt: skip


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_equals_the_op_and_the_reference_update(cls, dtype):
    """8-bit tensors: exactly the op's result; fp32-state tensors: exactly the reference's
    float32 update with bias corrections from their own step, rounded into p's dtype."""
    torch.manual_seed(0)
    shapes = [(70, 90), (4099,), (17,), (3, 5)]
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    lr, wd = 3e-3, 0.05
    opt = cls(params, lr=lr, weight_decay=wd)
    decoupled = cls is AdamW8bit
    mine = [p.detach().clone() for p in params]
    states = [None] * len(params)
    for t in range(1, 4):
        grads = [torch.randn(s).to(dtype) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        for i, g in enumerate(grads):
            if mine[i].numel() >= 4096:
                if t == 1:
                    nb = -(-mine[i].numel() // 256)
                    states[i] = dict(
                        state1=torch.zeros(shapes[i], dtype=torch.uint8),
                        state2=torch.zeros(shapes[i], dtype=torch.uint8),
                        absmax1=torch.zeros(nb), absmax2=torch.zeros(nb),
                        qmap1=LF.dynamic_map(True), qmap2=LF.dynamic_map(False),
                        step=torch.zeros(()), skipped=torch.zeros(()),
                    )  # fmt: skip
                manual_8bit_step(mine[i], g, states[i], lr, wd, decoupled)
            else:
                if t == 1:
                    states[i] = dict(m=torch.zeros(shapes[i]), v=torch.zeros(shapes[i]))
                p32, states[i]["m"], states[i]["v"] = adam_update(
                    mine[i].float(), g.float(), states[i]["m"], states[i]["v"], lr, B1, B2,
                    EPS, wd, decoupled, 1.0, t,
                )  # fmt: skip
                mine[i].copy_(p32)
        opt.step()
        assert_same_params(params, mine)
        for p, st in zip(params, states):
            if "m" in st:
                assert torch.equal(opt.state[p]["state1"], st["m"])
                assert torch.equal(opt.state[p]["state2"], st["v"])
            else:
                for key in ("state1", "state2", "absmax1", "absmax2", "step"):
                    assert torch.equal(opt.state[p][key], st[key]), key


def test_adamw_decays_before_the_update_adam_adds_l2():
    """First step from zero state, eps negligible: AdamW p1 = p0 (1 - lr wd) - lr sign(g);
    Adam's L2 term enters m and v instead (so it also moves p by lr, in the direction of
    g + wd p)."""
    p0 = torch.randn(5000) + 3.0
    g = torch.randn(5000) * 0.1
    lr, wd = 1e-2, 0.5
    pw, pa = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    pw.grad, pa.grad = g.clone(), g.clone()
    AdamW8bit([pw], lr=lr, weight_decay=wd).step()
    Adam8bit([pa], lr=lr, weight_decay=wd).step()
    torch.testing.assert_close(pw.detach(), p0 * (1 - lr * wd) - lr * torch.sign(g))
    torch.testing.assert_close(pa.detach(), p0 - lr * torch.sign(g + wd * p0))


def test_one_fused_call_per_param_group(monkeypatch):
    """One call of each multi-step per param group that has tensors of its kind: the 8-bit
    one and the float32-state one (below min_8bit_size)."""
    calls_8bit = spy_on_router(monkeypatch, "adam8bit_multi_step_")
    calls_float = spy_on_router(monkeypatch, "adam_multi_step_")
    groups = [
        {"params": [nn.Parameter(torch.randn(5000)) for _ in range(3)]},
        {"params": [nn.Parameter(torch.randn(70, 70).bfloat16()), nn.Parameter(torch.randn(4))],
         "lr": 1e-2},
        {"params": [nn.Parameter(torch.randn(8))]},  # no 8-bit tensor: no 8-bit call
    ]  # fmt: skip
    opt = AdamW8bit(groups)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    assert [len(args[0]) for args in calls_8bit] == [3, 1]
    assert [len(args[0]) for args in calls_float] == [1, 1]


def test_eager_step_skips_the_dispatcher_and_bumps_versions(monkeypatch):
    """A plain eager step runs the multi-step router directly (hyperparameters as floats) and
    bumps the version counters of what it wrote, as the dispatcher would; under the profiler
    (work for the dispatcher) it goes through adam8bit_group_step_. Both give the same
    parameters and state."""
    routed = spy_on_router(monkeypatch, "adam8bit_multi_step_")
    torch.manual_seed(0)
    fast = nn.Parameter(torch.randn(5000))
    slow = nn.Parameter(fast.detach().clone())
    opts = {}
    for p in (fast, slow):
        p.grad = torch.randn_like(p) * 1e-2 if p is fast else fast.grad.clone()
        opts[id(p)] = AdamW8bit([p], lr=torch.tensor(1e-3), weight_decay=0.01)
    saved = fast * fast  # autograd saves fast for the backward of this product
    before = fast._version
    opts[id(fast)].step()
    assert len(routed) == 1
    assert fast._version > before
    state = opts[id(fast)].state[fast]
    assert all(state[k]._version > 0 for k in ("state1", "state2", "absmax1", "absmax2", "step"))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    with torch.autograd.profiler.profile():
        opts[id(slow)].step()
    assert len(routed) == 1
    assert torch.equal(fast, slow)
    for name, t in opts[id(fast)].state[fast].items():
        assert torch.equal(t, opts[id(slow)].state[slow][name]), name


def test_param_groups_use_their_own_hyperparameters():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt = AdamW8bit([{"params": [a], "lr": 1e-2, "weight_decay": 0.1}, {"params": [b]}], lr=1e-3)
    alone_a = AdamW8bit([a2], lr=1e-2, weight_decay=0.1)
    alone_b = AdamW8bit([b2], lr=1e-3)
    for _ in range(3):
        ga, gb = torch.randn(5000), torch.randn(5000)
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        opt.step()
        alone_a.step()
        alone_b.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
    }


def _assert_untouched(opt, snapshot):
    params = [p for g in opt.param_groups for p in g["params"]]
    values, states = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p.detach(), before)
        for k, v in opt.state[p].items():
            if k not in ("qmap1", "qmap2"):
                assert torch.equal(v, states[id(p)][k]), k


def _bad_sparse(opt, b):
    b.grad = torch.randn(10).to_sparse()


def _bad_dtype(opt, b):
    b.data = b.data.double()
    b.grad = torch.randn(10, dtype=torch.float64)


def _bad_resize(opt, b):
    b.data = torch.randn(12)
    b.grad = torch.randn(12)


def _bad_lr(opt, b):
    opt.param_groups[1]["lr"] = -1.0


def _bad_blocksize(opt, b):
    opt.param_groups[0]["blocksize"] = 512


@pytest.mark.parametrize(
    "spoil, error, match",
    [
        (_bad_sparse, RuntimeError, "sparse"),
        (_bad_dtype, TypeError, "float32, float16 or bfloat16"),
        (_bad_resize, ValueError, "no longer fits"),
        (_bad_lr, ValueError, "learning rate"),
        (_bad_blocksize, ValueError, "blocksize=512 makes .* cannot change"),
    ],
    ids=["sparse-grad", "float64", "resized", "negative-lr", "blocksize"],
)
def test_bad_input_in_a_later_group_leaves_every_group_untouched(spoil, error, match):
    """Every group is screened before any is stepped (ARCHITECTURE.md: never a partially
    updated optimizer state): the first group, 8-bit, is not stepped when the second is bad."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(10))
    opt = AdamW8bit([{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.randn(5000), torch.randn(10)
    opt.step()
    a.grad, b.grad = torch.randn(5000), torch.randn(10)
    spoil(opt, b)
    snapshot = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    _assert_untouched(opt, snapshot)


def test_a_blocksize_changed_in_a_later_call_leaves_every_group_untouched():
    """The blocksize check of the calls screened before any is made (above, the changed group's
    call was the first one, which its op checks instead): the group with more tensors goes
    first, so the changed group's 8-bit state is screened."""
    torch.manual_seed(0)
    a1, a2, b = (nn.Parameter(torch.randn(5000)) for _ in range(3))
    opt = AdamW8bit([{"params": [a1, a2]}, {"params": [b]}])
    for _ in range(2):
        for p in (a1, a2, b):
            p.grad = torch.randn(5000)
        if opt.state:
            opt.param_groups[1]["blocksize"] = 512
            snapshot = _snapshot(opt)
            with pytest.raises(ValueError, match="blocksize=512 makes .* cannot change"):
                opt.step()
            _assert_untouched(opt, snapshot)
        else:
            opt.step()


@pytest.mark.parametrize("changed_group_first", [True, False], ids=["first-call", "later-call"])
def test_a_changed_blocksize_reads_the_same_in_any_call(changed_group_first):
    """The call made first is checked by its op, not screened; when its op refuses, the
    optimizer gives its own message, so that the same mistake reads the same in any call."""
    torch.manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(8192)) for _ in range(3))
    groups = [[a, b], [c]] if changed_group_first else [[a], [b, c]]
    opt = AdamW8bit([{"params": ps} for ps in groups])
    for p in (a, b, c):
        p.grad = torch.randn(8192)
    opt.step()
    opt.param_groups[0]["blocksize"] = 1024
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError, match="blocksize=1024 makes 8; the blocksize of a group"):
        opt.step()
    _assert_untouched(opt, snapshot)


def test_a_sparse_gradient_is_refused_by_name_in_the_first_call_too():
    """The call made first is not screened (its op checks it): the sparse gradient is
    refused while gathering, for every parameter, with the optimizer's own message."""
    for n in (10, 5000):
        p = nn.Parameter(torch.randn(n))
        opt = AdamW8bit([p])
        p.grad = torch.randn(n)
        opt.step()
        p.grad = torch.randn(n).to_sparse()
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            opt.step()


def test_parameters_without_elements_count_their_steps():
    """torch.optim.AdamW steps a zero-element parameter (nn.Linear(0, n)'s weight); so does
    this optimizer, and its other parameters train."""
    torch.manual_seed(0)
    layer = nn.Linear(0, 10)
    opt = AdamW8bit(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer(torch.randn(3, 0)).sum().backward()
        bias = layer.bias.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(layer.bias.detach(), bias)
    assert opt.state[layer.weight]["step"].item() == 2.0
    assert opt.state[layer.bias]["step"].item() == 2.0
    # A fractional loaded step reads as int(step) + 1 for both, as the kernels read it.
    for p in layer.parameters():
        opt.state[p]["step"].fill_(2.5)
    layer(torch.randn(3, 0)).sum().backward()
    opt.step()
    assert [opt.state[p]["step"].item() for p in layer.parameters()] == [3.0, 3.0]


def test_float32_states_for_a_group_keep_vanishing_gradients_tame():
    """The advice of the module docstring: a parameter whose gradient drops to zero takes
    huge steps with 8-bit states (v encodes as 0 where m does not) and ordinary ones in a
    group whose min_8bit_size keeps its states float32."""
    torch.manual_seed(0)
    g = torch.randn(5000)
    moves = {}
    for name, group in (("8-bit", {}), ("float32", {"min_8bit_size": 2**62})):
        p = nn.Parameter(torch.zeros(5000))
        opt = AdamW8bit([{"params": [p], **group}], lr=1e-3, weight_decay=0.0)
        p.grad = g.clone()
        opt.step()
        before = p.detach().clone()
        p.grad.zero_()
        opt.step()
        moves[name] = (p.detach() - before).abs().max().item()
    assert moves["8-bit"] > 1.0  # lr * m / eps
    assert moves["float32"] < 2e-3  # about lr, as torch.optim.AdamW


def test_lr_as_tensor_equals_lr_as_float():
    model_f, model_t = mlp(), mlp()
    x, y = regression_data(64)
    train(model_f, AdamW8bit(model_f.parameters(), lr=2e-3), x, y, 3)
    # float64: the same value as the Python float (a float32 tensor would hold 2e-3 rounded)
    lr = torch.tensor(2e-3, dtype=torch.float64)
    train(model_t, AdamW8bit(model_t.parameters(), lr=lr), x, y, 3)
    assert_same_params(params_of(model_f), params_of(model_t))


def test_noncontiguous_parameter():
    torch.manual_seed(0)
    w = torch.randn(128, 64)
    strided = nn.Parameter(w.t())  # a transposed view: 8-bit, not contiguous
    dense = nn.Parameter(w.t().contiguous())
    assert not strided.is_contiguous()
    opt_s, opt_d = AdamW8bit([strided]), AdamW8bit([dense])
    for _ in range(2):
        g = torch.randn(64, 128)
        strided.grad, dense.grad = g.clone(), g.clone()
        opt_s.step()
        opt_d.step()
    assert torch.equal(strided, dense) and not strided.is_contiguous()


def test_triton_backend_through_the_optimizer_equals_reference():
    if not lpk.available_backends()["triton"]:
        pytest.skip("triton backend not available")
    model_r, model_t = mlp(dtype=torch.bfloat16), mlp(dtype=torch.bfloat16)
    x, y = regression_data(64, dtype=torch.bfloat16)
    opt_r, opt_t = (
        AdamW8bit(model_r.parameters(), lr=1e-2),
        AdamW8bit(model_t.parameters(), lr=1e-2),
    )
    run_on("reference", train, model_r, opt_r, x, y, 2)
    run_on("triton", train, model_t, opt_t, x, y, 2)
    assert_same_params(params_of(model_r), params_of(model_t))


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("n", [5000, 100], ids=["8bit", "fp32-state"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_that_tensor_only(n, bad):
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(n)), nn.Parameter(torch.randn(n))
    opt = AdamW8bit([p, q], lr=1e-2)
    p.grad, q.grad = torch.randn(n), torch.randn(n)
    opt.step()
    p_before, q_before = p.detach().clone(), q.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad, q.grad = torch.randn(n), torch.randn(n)
    p.grad[n // 3] = bad
    opt.step()  # raises nothing
    assert torch.equal(p, p_before), "the parameter with a bad gradient moved"
    for key, value in state_before.items():
        if key != "skipped":
            assert torch.equal(opt.state[p][key], value), key
    assert opt.state[p]["skipped"].item() == 1 and opt.state[p]["step"].item() == 1
    assert not torch.equal(q, q_before) and opt.state[q]["step"].item() == 2
    assert opt.skipped_steps() == 1
    p.grad = torch.randn(n)
    opt.step()
    assert opt.state[p]["step"].item() == 2 and opt.skipped_steps() == 1


# ---------------------------------------------------------------- torch.optim behaviour


def test_zero_grad_and_params_without_grad():
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(50))
    opt = AdamW8bit([a, b], lr=1e-2)
    a.grad = torch.randn(5000)
    opt.step()
    assert b not in opt.state, "a parameter without a gradient gets no state"
    opt.zero_grad()
    assert a.grad is None
    before = a.detach().clone()
    opt.step()
    assert torch.equal(a, before)
    a.grad = torch.randn(5000)
    opt.zero_grad(set_to_none=False)
    assert a.grad is not None and not a.grad.any()


def test_closure_and_step_hooks():
    model = mlp()
    x, y = regression_data(64)
    opt = AdamW8bit(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: calls.append(("global-post", o))
    )
    try:

        def closure():
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss

        loss = opt.step(closure)
    finally:
        handle.remove()
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert calls == [("pre", opt), ("post", opt), ("global-post", opt)]
    assert opt.state[model[2].weight]["step"].item() == 1


def test_unsupported_parameters():
    p = nn.Parameter(torch.randn(10, dtype=torch.float64))
    p.grad = torch.randn(10, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        AdamW8bit([p]).step()
    e = nn.Embedding(10, 3, sparse=True)
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW8bit(e.parameters()).step()


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    ],
    ids=["StepLR", "LambdaLR"],
)
def test_lr_schedulers(make_scheduler):
    """A scheduler's lr reaches every step: same result as setting the lr by hand."""
    model_s, model_h = mlp(), mlp()
    x, y = regression_data(64)
    opt_s, opt_h = (
        AdamW8bit(model_s.parameters(), lr=1e-2),
        AdamW8bit(model_h.parameters(), lr=1e-2),
    )
    scheduler = make_scheduler(opt_s)
    for _ in range(5):
        lr = opt_s.param_groups[0]["lr"]
        opt_h.param_groups[0]["lr"] = lr
        train(model_s, opt_s, x, y, 1, scheduler)
        train(model_h, opt_h, x, y, 1)
    assert opt_s.param_groups[0]["lr"] < 1e-2
    assert_same_params(params_of(model_s), params_of(model_h))


def test_lr_schedule_to_zero_freezes_parameters():
    model = mlp()
    x, y = regression_data(64)
    opt = Adam8bit(model.parameters(), lr=1e-2)  # no decay: lr 0 means no change at all
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.0)
    train(model, opt, x, y, 2, scheduler)
    frozen = params_of(model)
    train(model, opt, x, y, 2, scheduler)
    assert_same_params(params_of(model), frozen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_scaler_with_autocast(dtype):
    model = mlp()
    x, y = regression_data(128)
    opt = AdamW8bit(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    start = params_of(model)
    losses = []
    for i in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model, x, y)
        # The first step's gradients overflow: the scaler skips that step (the optimizer
        # does not run) and lowers the scale; later steps proceed.
        scaler.scale(loss * float("inf") if i == 0 else loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        if i == 0:
            assert len(opt.state) == 0, "the scaler should have skipped the overflowing step"
            assert_same_params(params_of(model), start)
            assert scaler.get_scale() < 2.0**16
    steps = opt.state[model[2].weight]["step"].item()
    assert 20 <= steps <= 29 and opt.skipped_steps() == 0
    assert losses[-1] < 0.5 * losses[1]


# ---------------------------------------------------------------- checkpoints


def _save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_resume_is_bit_identical(cls, dtype):
    x, y = regression_data(128, dtype=dtype)
    hyper = dict(lr=5e-3, weight_decay=0.02)
    straight = mlp(dtype=dtype)
    train(straight, cls(straight.parameters(), **hyper), x, y, 8)

    first = mlp(dtype=dtype)
    opt = cls(first.parameters(), **hyper)
    train(first, opt, x, y, 4)
    checkpoint = _save_and_load({"model": first.state_dict(), "optim": opt.state_dict()})
    resumed = mlp(seed=123, dtype=dtype)  # different initial values: all come from the file
    resumed.load_state_dict(checkpoint["model"])
    opt2 = cls(resumed.parameters(), lr=1.0)  # hyperparameters come from the file too
    opt2.load_state_dict(checkpoint["optim"])
    assert opt2.param_groups[0]["lr"] == hyper["lr"]
    w = resumed[2].weight
    assert opt2.state[w]["absmax1"].dtype == torch.float32, "state kept its dtype"
    train(resumed, opt2, x, y, 4)
    assert_same_params(params_of(resumed), params_of(straight))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_step_inside_a_device_context(backend):
    """A step run inside ``with torch.device(...)`` (training loops written for "cuda" do so)
    builds its host-side tables on the host: here the meta device, which has no data, so a
    table built there would fail to copy."""
    x, y = regression_data()
    inside, outside = mlp(), mlp()
    opt_inside = AdamW8bit(inside.parameters(), lr=1e-2)
    opt_outside = AdamW8bit(outside.parameters(), lr=1e-2)
    with lpk.use_backend(backend):
        for _ in range(3):
            for model, opt in ((inside, opt_inside), (outside, opt_outside)):
                opt.zero_grad()
                loss_fn(model, x, y).backward()
            with torch.device("meta"):
                opt_inside.step()
            opt_outside.step()
    assert_same_params(params_of(inside), params_of(outside))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("min_8bit_size", [4096, 2**62], ids=["8bit", "fp32-state"])
def test_large_finite_gradient_keeps_v_finite_as_torch(backend, min_8bit_size):
    """A finite gradient whose square alone overflows float32 (3e19): v takes
    ((1 - beta2) * g) * g as torch's addcmul_, so it stays finite (an infinite v froze the
    element, or made its whole 8-bit block NaN on the next step)."""
    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(8192))
    theirs = nn.Parameter(ours.detach().clone())
    opt = AdamW8bit([ours], lr=1e-3, min_8bit_size=min_8bit_size)
    reference = torch.optim.AdamW([theirs], lr=1e-3)
    with lpk.use_backend(backend):
        for step in range(3):
            g = torch.randn(8192)
            if step == 0:
                g[5] = 3e19
            ours.grad, theirs.grad = g.clone(), g.clone()
            opt.step()
            reference.step()
    state = opt.state[ours]
    v = state["absmax2"] if "absmax2" in state else state["state2"]  # 8-bit: the scales
    assert torch.isfinite(v).all() and torch.isfinite(ours).all() and opt.skipped_steps() == 0
    # The element keeps moving as torch's does (v ~ 9e35 on both).
    torch.testing.assert_close(ours[5], theirs[5], rtol=0, atol=1e-3)
    assert ours[5] != 0 and (ours - theirs).abs().max() < 0.05


def test_loaded_state_is_a_copy():
    model = mlp()
    x, y = regression_data(64)
    opt = AdamW8bit(model.parameters())
    train(model, opt, x, y, 1)
    sd = opt.state_dict()
    other = AdamW8bit(mlp().parameters())
    other.load_state_dict(sd)
    s_live = opt.state[model[2].weight]["state1"]
    s_loaded = other.state[other.param_groups[0]["params"][2]]["state1"]
    assert torch.equal(s_live, s_loaded) and s_live.data_ptr() != s_loaded.data_ptr()


def _state_snapshot(opt):
    return {
        i: {k: v.clone() for k, v in s.items()}
        for i, s in enumerate(opt.state[p] for g in opt.param_groups for p in g["params"])
    }


def _tamper(sd, param_index, key, value):
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    sd["state"][param_index][key] = value
    return sd


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda sd: {**sd, "param_groups": sd["param_groups"] * 2}, "parameter groups"),
        (lambda sd: _tamper(sd, 2, "state1", torch.zeros(96 * 96, dtype=torch.uint8)), "state1"),
        (lambda sd: _tamper(sd, 2, "absmax2", torch.ones(3)), "absmax2"),
        (lambda sd: _tamper(sd, 2, "qmap1", torch.linspace(-1, 1, 256)), "qmap1"),
        (
            lambda sd: _tamper(sd, 1, "state2", torch.zeros(128, dtype=torch.uint8)),
            "state1 and state2",
        ),
        (lambda sd: _tamper(sd, 0, "step", torch.tensor(-1.0)), "step"),
    ],
    ids=["group-count", "state1-size", "absmax-size", "qmap", "mixed-kinds", "step"],
)
def test_state_dict_of_another_model_is_refused(make_bad, match):
    model = mlp()
    x, y = regression_data(64)
    opt = AdamW8bit(model.parameters(), lr=2e-3)
    train(model, opt, x, y, 2)
    before = _state_snapshot(opt)
    bad = make_bad(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    after = _state_snapshot(opt)
    assert opt.param_groups[0]["lr"] == 2e-3
    for i in before:
        for k in before[i]:
            assert torch.equal(before[i][k], after[i][k]), f"param {i} {k} changed"


def test_state_of_a_differently_shaped_model_is_refused():
    """Same structure, other widths: the first state that does not fit names itself."""
    narrow = mlp(hidden=96)
    x, y = regression_data(64)
    opt_narrow = AdamW8bit(narrow.parameters())
    train(narrow, opt_narrow, x, y, 1)
    opt = AdamW8bit(mlp().parameters())
    with pytest.raises(ValueError, match=r"parameter 0: state1 has 3072 elements"):
        opt.load_state_dict(opt_narrow.state_dict())
    assert len(opt.state) == 0


def test_load_state_dict_hooks_run():
    opt = AdamW8bit(mlp().parameters())
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.load_state_dict(AdamW8bit(mlp().parameters()).state_dict())
    assert seen == ["pre", "post"]


def test_loads_a_bitsandbytes_state_dict():
    bnb = pytest.importorskip("bitsandbytes")
    x, y = regression_data(64)
    model_b = mlp()
    opt_b = bnb.optim.AdamW8bit(model_b.parameters(), lr=1e-3)
    train(model_b, opt_b, x, y, 3)
    model = mlp()
    model.load_state_dict(model_b.state_dict())
    opt = AdamW8bit(model.parameters())
    opt.load_state_dict(opt_b.state_dict())
    w = model[2].weight
    assert opt.state[w]["step"].item() == 3 and opt.state[w]["state1"].dtype == torch.uint8
    losses = train(model, opt, x, y, 3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitsandbytes_loads_our_state_dict_and_keeps_counting(dtype):
    """bitsandbytes casts every non-uint8 tensor of a loaded state to the parameter's dtype:
    our counts are Python numbers, as its own, so a bf16 model's step keeps counting past
    256 there. The live state keeps its float32 tensors."""
    bnb = pytest.importorskip("bitsandbytes")
    model = mlp(dtype=dtype)
    opt = AdamW8bit(model.parameters())
    for _ in range(258):
        opt.zero_grad()
        model(torch.ones(2, 32, dtype=dtype)).float().sum().backward()
        opt.step()
    saved = opt.state_dict()
    assert all(
        type(s["step"]) is int and type(s["skipped"]) is int for s in saved["state"].values()
    )
    assert (
        saved["state"][0]["step"] == 258
        and opt.state[model[0].weight]["step"].dtype == torch.float32
    )
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    theirs = bnb.optim.AdamW8bit(model.parameters())
    theirs.load_state_dict(loaded)
    for _ in range(3):
        theirs.zero_grad()
        model(torch.ones(2, 32, dtype=dtype)).float().sum().backward()
        theirs.step()
    assert int(theirs.state[model[0].weight]["step"]) == 261
    again = AdamW8bit(model.parameters())
    again.load_state_dict(loaded)
    assert again.state[model[0].weight]["step"].item() == 258


# ---------------------------------------------------------------- training quality


# 200 full-batch steps on a regression with noise (floor 0.01) and more samples than the
# net can memorize in that time: the loss is still falling at the end, so late losses
# measure the optimizers. One run's final loss is no measure: late training has loss
# spikes, and runs that differ only in rounding (the 1e-6 relative change of the inputs
# that another machine's matmuls amount to) end 15-50% apart on some seeds, for either
# optimizer. So the statistic is the mean of the last LAST losses, its ratio to torch's
# averaged (geometrically) over SEEDS seeds. Measured here under such perturbations:
# Adam8bit vs torch.optim.Adam -1.2% to +3.9%, AdamW8bit vs torch.optim.AdamW -3.5% to -2.5%.
QUALITY = dict(n=2048, hidden=64, lr=3e-3, steps=200, rel=0.05, seeds=8, last=20)


def _quality_run(make_opt, seed=0):
    x, y = regression_data(QUALITY["n"], seed=seed + 1)
    model = mlp(seed=seed, hidden=QUALITY["hidden"])
    return train(model, make_opt(model.parameters()), x, y, QUALITY["steps"])


def _late_loss_ratio(make_ours, make_theirs) -> float:
    """Geometric mean over seeds of (our mean late loss) / (their mean late loss)."""
    logs = []
    for seed in range(QUALITY["seeds"]):
        ours, theirs = _quality_run(make_ours, seed), _quality_run(make_theirs, seed)
        late_ours, late_theirs = ours[-QUALITY["last"] :], theirs[-QUALITY["last"] :]
        assert sum(late_ours) / len(late_ours) < 0.1 * ours[0], (seed, ours[0], late_ours)
        logs.append(math.log(sum(late_ours) / sum(late_theirs)))
    return math.exp(sum(logs) / len(logs))


def test_training_matches_torch_adamw():
    hyper = dict(lr=QUALITY["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ratio = _late_loss_ratio(
        lambda params: AdamW8bit(params, **hyper), lambda params: torch.optim.AdamW(params, **hyper)
    )
    assert abs(ratio - 1) <= QUALITY["rel"], ratio


def test_adam_with_l2_matches_torch_adam():
    hyper = dict(lr=QUALITY["lr"], weight_decay=1e-3)
    ratio = _late_loss_ratio(
        lambda params: Adam8bit(params, **hyper), lambda params: torch.optim.Adam(params, **hyper)
    )
    assert abs(ratio - 1) <= QUALITY["rel"], ratio


def test_training_matches_bitsandbytes_adamw8bit():
    """bitsandbytes 0.50 runs its 8-bit AdamW on CPU: the loss curves stay together (not
    bit-identical: its encoder is not exactly nearest and its arithmetic order differs)."""
    bnb = pytest.importorskip("bitsandbytes")
    ours = _quality_run(lambda params: AdamW8bit(params, lr=QUALITY["lr"]))
    theirs = _quality_run(lambda params: bnb.optim.AdamW8bit(params, lr=QUALITY["lr"]))
    for step in (9, 49, 99, 199):
        assert abs(ours[step] - theirs[step]) <= QUALITY["rel"] * theirs[step], step


def test_state_memory_is_a_quarter_of_torch_adamw():
    """2 bytes of state per element plus 8 bytes of absmax per 256 (and two shared 1 KiB
    maps), against torch's 8 bytes per element: 25.4% for a large tensor."""
    n = 1 << 20

    def state_bytes(opt, p):
        return sum(
            t.numel() * t.element_size()
            for t in opt.state[p].values()
            if isinstance(t, torch.Tensor)
        )

    ours, theirs = nn.Parameter(torch.randn(n)), nn.Parameter(torch.randn(n))
    ours.grad, theirs.grad = torch.randn(n), torch.randn(n)
    opt_ours, opt_theirs = AdamW8bit([ours]), torch.optim.AdamW([theirs])
    opt_ours.step()
    opt_theirs.step()
    ratio = state_bytes(opt_ours, ours) / state_bytes(opt_theirs, theirs)
    assert ratio <= 0.27, ratio


def test_opcheck_of_the_optimizers_fused_op():
    """The private op the optimizers call (hyperparameters as a tensor, for torch.compile):
    schema and mutation annotations, fake implementation, AOT dispatch."""
    from lowprec_kernels.optim.adam8bit import _hyperparameters_tensor

    sizes, dtypes = (300, 70), (torch.float32, torch.bfloat16)

    def per_tensor(make):
        return [make(n, d) for n, d in zip(sizes, dtypes)]

    args = (
        per_tensor(lambda n, d: torch.randn(n, dtype=d)),
        per_tensor(lambda n, d: torch.randn(n, dtype=d)),
        per_tensor(lambda n, d: torch.randint(0, 256, (n,), dtype=torch.uint8)),
        per_tensor(lambda n, d: torch.randint(0, 256, (n,), dtype=torch.uint8)),
        per_tensor(lambda n, d: torch.rand(-(-n // 64)) + 0.1),
        per_tensor(lambda n, d: torch.rand(-(-n // 64)) + 0.1),
        LF.dynamic_map(True), LF.dynamic_map(False),
        per_tensor(lambda n, d: torch.tensor(3.0)),
        per_tensor(lambda n, d: torch.tensor(0.0)),
        _hyperparameters_tensor(1e-3, 0.9, 0.999, 1e-8, 0.01), True, 64,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lowprec.adam8bit_group_step_.default, args)


# ---------------------------------------------------------------- torch.compile


def _twin_runs(steps, make_opt, schedule, compiled_step):
    """The same training run twice: eager, and with ``compiled_step(opt)`` as the step."""
    x, y = regression_data(64)
    results = []
    for compiled in (False, True):
        model = mlp()
        opt = make_opt(model.parameters())
        step = compiled_step(opt) if compiled else opt.step
        for i in range(steps):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            step()
            schedule(opt, i)
        results.append(params_of(model))
    assert_same_params(*results)


def _halve_lr(opt, i):
    for group in opt.param_groups:
        group["lr"] = group["lr"] * 0.5


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_fullgraph_no_recompile_per_lr(backend):
    """opt.step compiles as one graph; an lr changing every step compiles twice in all
    (its first value, then as a dynamic input), and the results equal eager bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    _twin_runs(
        5, lambda params: AdamW8bit(params, lr=1e-2), _halve_lr,
        lambda opt: torch.compile(opt.step, fullgraph=True, backend=counter),
    )  # fmt: skip
    assert counter.frame_count <= 2


def test_compiled_training_step_with_scheduler():
    """A compiled training step (the scheduler wraps opt.step in code torch.compile does not
    trace, so the step is its own frame): no graph break inside the step, no recompile per
    scheduled lr, eager results."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    schedulers = {}

    def make_opt(params):
        opt = Adam8bit(params, lr=1e-2, weight_decay=1e-3)
        schedulers[opt] = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return opt

    _twin_runs(
        5, make_opt, lambda opt, i: schedulers[opt].step(),
        lambda opt: torch.compile(lambda: opt.step(), backend=counter),
    )  # fmt: skip
    assert counter.frame_count <= 2
    opt = next(iter(schedulers))
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_step_with_tensor_lr_never_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def halve_tensor_lr(opt, i):
        opt.param_groups[0]["lr"].mul_(0.5)

    _twin_runs(
        4, lambda params: AdamW8bit(params, lr=torch.tensor(1e-2)), halve_tensor_lr,
        lambda opt: torch.compile(opt.step, fullgraph=True, backend=counter),
    )  # fmt: skip
    assert counter.frame_count == 1


def test_a_parameter_twice_in_a_group_is_refused():
    p = nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="more than once"):
        AdamW8bit([p, p])
    with pytest.raises(ValueError, match="more than once"):
        AdamW8bit([("a", p), ("b", p)])  # named parameters
    opt = AdamW8bit(q for q in [nn.Parameter(torch.randn(3))])  # a generator still works
    assert len(opt.param_groups[0]["params"]) == 1
    group = {"params": [nn.Parameter(torch.randn(3))], "lr": 0.5}
    opt.add_param_group(group)
    assert opt.param_groups[1] is group  # the caller's dict, as in torch.optim


def test_a_torch_adamw_state_dict_is_refused_for_what_it_is():
    """A torch.optim.AdamW checkpoint holds exp_avg / exp_avg_sq, not 8-bit states: the error
    says so instead of listing missing keys, and the optimizer stays as it was."""
    p = nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    torch_opt = torch.optim.AdamW([p])
    torch_opt.step()
    q = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([q])
    with pytest.raises(ValueError, match=r"a torch.optim.Adam/AdamW state \(exp_avg, exp_avg_sq"):
        opt.load_state_dict(torch_opt.state_dict())
    assert len(opt.state) == 0

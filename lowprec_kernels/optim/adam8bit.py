"""8-bit Adam and AdamW: m and v kept as blockwise 8-bit codes, one fused step per group.

The update is ``reference/adam8bit.py``'s (ARCHITECTURE.md §4, §4.1): float32 arithmetic,
bias corrections from each tensor's own step, AdamW decaying the parameter before the
update as ``torch.optim.AdamW`` does, Adam adding ``weight_decay * p`` to the gradient as
``torch.optim.Adam`` does.

State, per parameter ``p`` in ``optimizer.state[p]`` (bitsandbytes' names):

=============  ===================================================================
``step``       float32 0-dim tensor on p's device: steps taken (skipped ones excluded)
``skipped``    float32 0-dim tensor: steps skipped for a non-finite gradient
``state1``     m: uint8 codes shaped like p (signed dynamic map), or float32 for
               tensors with fewer than ``min_8bit_size`` elements
``state2``     v: uint8 codes (unsigned dynamic map), or float32 likewise
``absmax1/2``  float32 [ceil(numel / blocksize)]: one scale per block (8-bit only)
``qmap1/2``    float32 [256]: the signed / unsigned dynamic maps (8-bit only)
=============  ===================================================================

A gradient holding a NaN or an Inf raises nothing: that parameter's values, state and
``step`` stay exactly as they were, the other parameters update, and its ``skipped``
counter goes up by one. Read one counter with ``optimizer.state[p]["skipped"].item()``, or
the total over all parameters with ``optimizer.skipped_steps()``. Nothing waits for the
device during a step unless ``lr`` is a tensor on the GPU (it is read on the host).

Parameters whose gradient often falls to exactly zero (rows of a dense embedding that a
batch does not touch, units that stop firing): an element whose v is below 1.6e-7 of its
block's largest encodes as exactly 0 (the nearest entry; bitsandbytes' GPU encoder rounds
the same way, its CPU one does not) while its m, on the signed map's finer scale, does
not; when its gradient then vanishes, its update is
``lr * m / eps``, up to tens of thousands of times the learning rate (a dense
``nn.Embedding`` trained on batches touching some rows moved by 11 with lr 1e-3). Keep such
parameters in float32 states, in a param group of their own with a ``min_8bit_size``
above their size (bitsandbytes' StableEmbedding advice is the same).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lowprec_kernels import _dispatch, _ops
from lowprec_kernels._ops import BLOCKSIZES_8BIT, CODEBOOK_SIZE_8BIT, FLOAT_DTYPES, num_blocks
from lowprec_kernels._tables import (
    TableCache,
    caching_allowed,
    device_key,
    shared_dynamic_map,
    to_device,
)
from lowprec_kernels.reference.adam8bit import adam_update_corrected, update_scalars

# bitsandbytes' state_dict() nests a parameter's quantization tensors under this key.
_BNB_WRAPPED_STATE = "__bnb_optimizer_quant_state__"


def _dynamic_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (signed, unsigned) dynamic maps on ``device``, shared by every 8-bit state there:
    one map per device is what lets a whole param group go through one fused call."""
    return shared_dynamic_map(True, device), shared_dynamic_map(False, device)


# torch.optim.Adam's options that change what a step computes or guarantees, which a
# param-group dict could carry (a group copied from a torch optimizer, or loaded from its state
# dict): refused when set rather than silently ignored. Its `foreach` and `fused` only choose
# torch's implementation (ours is always one fused call per group): accepted and ignored.
# `decoupled_weight_decay` is honoured, per group, as torch.optim.Adam does.
_UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable")


def _check_group_options(owner: str, group: dict[str, Any]) -> None:
    """ValueError for an unsupported torch.optim.Adam option that ``group`` sets."""
    for option in _UNSUPPORTED_OPTIONS:
        if group.get(option):
            raise ValueError(
                f"{owner}: {option}={group[option]!r} is not supported (torch.optim.Adam's "
                "option; these optimizers have no such mode)"
            )


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """ValueError naming the argument, worded as torch.optim's own checks."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid learning rate: lr must be a number or a one-element "
                             f"tensor, got a tensor of shape {tuple(lr.shape)}")  # fmt: skip
        lr = lr.item()
    # (Finite too, unlike torch.optim: the fused ops refuse an infinite one, which would
    # reach the parameters after the gradient's finiteness check.)
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: lr={lr} (must be finite and >= 0)")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: betas[{i}]={beta} "
                             "(must be in [0, 1))")  # fmt: skip
    if not group["eps"] >= 0.0:
        raise ValueError(f"Invalid epsilon value: eps={group['eps']} (must be >= 0)")
    if not 0.0 <= group["weight_decay"] < math.inf:
        raise ValueError(f"Invalid weight_decay value: weight_decay={group['weight_decay']} "
                         "(must be finite and >= 0)")  # fmt: skip
    if type(group["blocksize"]) is not int or group["blocksize"] not in BLOCKSIZES_8BIT:
        raise ValueError(
            f"Invalid blocksize: blocksize={group['blocksize']} (must be one of {BLOCKSIZES_8BIT})"
        )
    min_8bit_size = group["min_8bit_size"]
    if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
        raise ValueError(
            f"Invalid min_8bit_size: min_8bit_size={min_8bit_size!r} (must be an int >= 0)"
        )
    decoupled = group.get("decoupled_weight_decay", False)
    if type(decoupled) is not bool:
        raise ValueError(f"Invalid decoupled_weight_decay: decoupled_weight_decay={decoupled!r} "
                         "(must be True or False)")  # fmt: skip


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _refuse_dtensor(owner: str, p: torch.Tensor) -> None:
    """TypeError for a sharded (DTensor) parameter, which these optimizers do not step: its
    state would be made for the whole tensor on every rank, and a skip for a non-finite
    gradient would be each rank's own decision."""
    if _is_dtensor(p):
        raise TypeError(
            f"{owner}: a parameter of shape {tuple(p.shape)} is a DTensor (sharded by FSDP2 "
            "or tensor parallelism), which this optimizer does not support yet; step such "
            "parameters with torch.optim.AdamW (DDP's unsharded parameters work)"
        )


def _hyperparameter(x):
    """A hyperparameter as the update takes it. A Python float passes through untouched:
    under torch.compile a symbolic float stays symbolic (float() would specialize on its
    value). A tensor (lr) becomes a float64 0-dim tensor, never a number: .item() would end
    the compiled graph."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).reshape(())
    if isinstance(x, int):
        return float(x)
    return x


def _split_by_device(*lists: list[torch.Tensor]) -> list[list[list[torch.Tensor]]]:
    """Per device of the first list's tensors (in order of appearance), the lists cut down to
    the positions on that device: one fused call needs all its tensors on one device."""
    devices: list[torch.device] = []
    for t in lists[0]:
        if t.device not in devices:
            devices.append(t.device)
    if len(devices) <= 1:
        return [list(lists)] if devices else []
    positions = [[i for i, t in enumerate(lists[0]) if t.device == d] for d in devices]
    return [[[tensors[i] for i in ix] for tensors in lists] for ix in positions]


class Adam8bit(torch.optim.Optimizer):
    """Adam with 8-bit states (bitsandbytes' ``Adam8bit``); ``weight_decay`` is L2, added to
    the gradient as in ``torch.optim.Adam`` (bitsandbytes' ``Adam8bit`` decays the weights
    directly, as AdamW does: with ``weight_decay > 0`` its checkpoints continue differently
    here).

    Args:
        params: parameters or param groups (dicts with their own hyperparameters).
        lr: learning rate, a float or a one-element tensor, read as float64 (a tensor lr
            changes without recompiling a compiled step; keep it on the CPU, where the
            fused kernels' launcher reads it without waiting for the GPU).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: L2 penalty (``AdamW8bit``: decoupled decay).
        blocksize: elements per quantization block of the 8-bit states (64 .. 4096).
        min_8bit_size: tensors with fewer elements keep float32 states.
        decoupled_weight_decay: decay the parameter directly, as ``AdamW8bit`` does
            (``torch.optim.Adam``'s option; a param group may set it too, and each group's
            own value holds, as in torch).
        amsgrad, maximize, capturable, differentiable, foreach, fused: torch.optim.Adam's
            keywords, so that its arguments carry over: accepted at their defaults
            (``foreach`` and ``fused`` at any value: they pick torch's implementation),
            ValueError when they ask for a mode these optimizers lack.

    Parameters must be float32, float16 or bfloat16 (their gradients of the same dtype);
    the update is computed in float32 and rounded once into the parameter's dtype. See the
    module docstring for the state layout and how skipped steps are counted.
    """

    # The decay of a group that does not say (one of an older state dict, or a group edited by
    # hand); a group made by the constructor or add_param_group always says.
    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
        *,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        del foreach, fused  # torch's choice of implementation: nothing to choose here
        _check_group_options(
            type(self).__name__,
            dict(amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                 differentiable=differentiable),
        )  # fmt: skip
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, blocksize=blocksize,
            min_8bit_size=min_8bit_size, decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, with the group's hyperparameters checked
        first (the constructor's groups come through here too)."""
        given = {k: v for k, v in param_group.items() if k != "params"}
        _check_hyperparameters({**self.defaults, **given})
        _check_group_options(type(self).__name__, given)
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # torch refuses sets itself
            params = param_group["params"] = list(params)  # it may be a generator
            tensors = [x[1] if isinstance(x, tuple) else x for x in params]  # (name, tensor)
            for t in tensors:
                _refuse_dtensor(type(self).__name__, t)
            if len(set(map(id, tensors))) != len(tensors):
                # torch only warns; the fused step would update such a tensor twice, from two
                # threads at once.
                raise ValueError(
                    f"{type(self).__name__}: a parameter appears more than once in a param group"
                )
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------- state

    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        _refuse_dtensor(type(self).__name__, p)  # (made one after the optimizer, say)
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: parameters must be float32, float16 or bfloat16, "
                f"got {p.dtype} (shape {tuple(p.shape)})"
            )
        device = p.device
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        state["skipped"] = torch.zeros((), dtype=torch.float32, device=device)
        if p.numel() >= group["min_8bit_size"]:
            n_blocks = num_blocks(p.numel(), group["blocksize"])
            state["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=device)
            state["absmax1"] = torch.zeros(n_blocks, dtype=torch.float32, device=device)
            state["absmax2"] = torch.zeros(n_blocks, dtype=torch.float32, device=device)
            state["qmap1"], state["qmap2"] = _dynamic_maps(device)
        else:
            state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=device)

    def _init_group(
        self, group, params8, grads8, state1, state2, absmax1, absmax2, qmap1, qmap2, steps8,
        skipped8, params32, grads32, exp_avgs, exp_avg_sqs, steps32, skipped32, empty_steps,
    ) -> None:  # fmt: skip
        """Sorts the group's parameters that have a gradient into the 8-bit and the float32
        state lists, creating state on first use. Parameters with no elements only count
        their step (``empty_steps``): there is nothing to update. (torch.compile runs a
        method of this name eagerly instead of tracing it, as for torch's own optimizers.)"""
        _check_hyperparameters(group)
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:  # every parameter: the first call is not screened
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state.get(p)  # (not self.state[p], which would record an empty state)
            if not state:
                state = {}
                self._init_state(p, state, group)  # may refuse p: then nothing is recorded
                self.state[p] = state
            if p.numel() == 0:
                empty_steps.append(state["step"])
            elif state["state1"].dtype == torch.uint8:
                params8.append(p)
                grads8.append(grad)
                state1.append(state["state1"])
                state2.append(state["state2"])
                absmax1.append(state["absmax1"])
                absmax2.append(state["absmax2"])
                qmap1.append(state["qmap1"])
                qmap2.append(state["qmap2"])
                steps8.append(state["step"])
                skipped8.append(state["skipped"])
            else:
                params32.append(p)
                grads32.append(grad)
                exp_avgs.append(state["state1"])
                exp_avg_sqs.append(state["state2"])
                steps32.append(state["step"])
                skipped32.append(state["skipped"])

    def _screen(self, call) -> Exception | None:
        """The error, naming the parameter, for what a fused op would refuse of one call's
        tensors, or None. ``step`` raises it for every call but the one it makes first, before
        making any, so that bad input leaves the whole optimizer as it was; the first call's
        op checks its tensors before it writes, and ``step`` asks this for the message when it
        refuses. The ops' checks stay the authority; this repeats those a user can trip over
        through the optimizer: a parameter of another dtype, or one resized or moved since its
        state was made (``_init_group`` refuses sparse gradients, and torch's ``p.grad``
        setter keeps a gradient's dtype, shape and device those of its parameter). ~0.4 us
        per parameter; the messages only on failure."""
        group, _, eight_bit, split = call
        params, states = split[0], split[2]
        absmax1 = split[4] if eight_bit else None
        for i, (p, s1) in enumerate(zip(params, states)):
            if not (
                p.dtype in FLOAT_DTYPES and s1.numel() == p.numel() and s1.device == p.device
                and (
                    absmax1 is None
                    or absmax1[i].numel() == num_blocks(p.numel(), group["blocksize"])
                )
            ):  # fmt: skip
                return self._refusal(p, self.state[p], group)
        return None

    def _refusal(self, p: torch.Tensor, state: dict, group) -> Exception:
        """The error for a parameter ``_screen`` turned down."""
        where = f"{type(self).__name__}: parameter of shape {tuple(p.shape)}"
        if p.dtype not in FLOAT_DTYPES:
            return TypeError(
                f"{where}: parameters must be float32, float16 or bfloat16, got {p.dtype}"
            )
        s1 = state["state1"]
        if s1.numel() != p.numel() or s1.device != p.device:
            return ValueError(
                f"{where}: its state (of {s1.numel()} elements, on {s1.device}) no "
                f"longer fits it ({p.numel()} elements, on {p.device}); load a state dict for "
                "this model or create the optimizer after moving or resizing it"
            )
        blocks = num_blocks(p.numel(), group["blocksize"])
        return ValueError(
            f"{where}: its 8-bit state has {state['absmax1'].numel()} blocks, but "
            f"blocksize={group['blocksize']} makes {blocks}; the blocksize of a group cannot "
            "change once it has state"
        )

    def skipped_steps(self) -> int:
        """Updates skipped for a non-finite gradient, summed over all parameters (one step
        with two bad gradients counts two). Reads the counters with one read per device, so
        it waits for the device."""
        counters = [s["skipped"] for s in self.state.values() if "skipped" in s]
        return int(sum(_counts_as_numbers(counters)))

    # ----------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (re-evaluating the loss) as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is gathered, and every fused call screened but the first one made (whose
        # op checks everything before it writes), before any call is made: bad input raises
        # with the optimizer as it was (ARCHITECTURE.md: never a partially updated state).
        # The call with the most tensors goes first, so the fewest are screened.
        calls = []
        empty_steps = []
        for group in self.param_groups:
            lists = tuple([] for _ in range(16))
            self._init_group(group, *lists, empty_steps)
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=_hyperparameter(group["lr"]), beta1=_hyperparameter(beta1),
                beta2=_hyperparameter(beta2), eps=_hyperparameter(group["eps"]),
                weight_decay=_hyperparameter(group["weight_decay"]),
                decoupled=group.get("decoupled_weight_decay", self.decoupled_weight_decay),
            )  # fmt: skip
            for split in _split_by_device(*lists[:10]):
                calls.append((group, hyper, True, split))
            for split in _split_by_device(*lists[10:]):
                calls.append((group, hyper, False, split))
        if calls:
            first = max(range(len(calls)), key=lambda i: len(calls[i][3][0]))
            for i, call in enumerate(calls):
                if i != first and (error := self._screen(call)) is not None:
                    raise error
            calls.insert(0, calls.pop(first))
            if torch.compiler.is_compiling():
                _make_call(calls[0])
            else:
                try:
                    _make_call(calls[0])
                except (RuntimeError, ValueError, TypeError) as op_error:
                    # Refused before it wrote anything: the optimizer's own message where it
                    # has one, so that a mistake reads the same whichever call it is in.
                    if (error := self._screen(calls[0])) is not None:
                        raise error from op_error
                    raise
        for call in calls[1:]:
            _make_call(call)
        for step in empty_steps:  # t = int(step) + 1, as the ops count
            step.copy_(step.trunc() + 1)
        return loss

    # ----------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, with each parameter's ``step`` and ``skipped`` counts
        as Python numbers (ints while whole), as bitsandbytes' own: its ``load_state_dict``
        casts every other tensor to the parameter's dtype, where a bf16 step stops counting at
        256. The optimizer's live state is not changed; the counters of all parameters are
        read from their device at once.

        bitsandbytes (0.50) loads it only with the default ``blocksize=256``: it does not read
        the saved blocksize, and its CPU step, which assumes 256, writes the parameter before
        it fails on another (a helper measured a non-finite parameter at 1024)."""
        state_dict = super().state_dict()
        entries = [
            (key, name)
            for key, param_state in state_dict["state"].items()
            for name in _COUNTERS
            if isinstance(param_state.get(name), torch.Tensor) and not param_state[name].is_meta
        ]
        values = _counts_as_numbers([state_dict["state"][k][name] for k, name in entries])
        packed = dict(state_dict["state"])  # the per-parameter dicts are the live ones: copy
        for (key, name), value in zip(entries, values):
            packed[key] = {**packed[key], name: value}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a ``state_dict()`` of this optimizer (or of bitsandbytes' ``Adam8bit`` /
        ``AdamW8bit``, whose ``step`` is an int and which counts no skipped steps).

        Everything is checked before anything changes: a state dict of another model (a
        different number of groups or parameters, a state whose size does not match its
        parameter, absmax not matching the blocksize, a foreign quantization map) raises
        ``ValueError`` and leaves this optimizer as it was. Unlike ``torch.optim``, state
        tensors keep their own dtypes (float32 scales and states are not cast to a half
        parameter's dtype) and are copied, never shared with ``state_dict``.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"loaded state dict has no {key!r} entry")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(groups)}"
            )
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(saved['params'])} "
                    f"parameters, this optimizer's has {len(group['params'])}"
                )
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            new_group = {**self.defaults, **saved, "params": group["params"]}
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]
            _check_hyperparameters(new_group)
            _check_group_options(f"loaded state dict for {type(self).__name__}", new_group)
            new_groups.append(new_group)
        owner = {}  # saved parameter id -> (parameter, its new group)
        for saved, new_group in zip(saved_groups, new_groups):
            for saved_id, p in zip(saved["params"], new_group["params"]):
                owner[saved_id] = (p, new_group)
        state = defaultdict(dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in owner:
                raise ValueError(
                    f"loaded state dict has state for parameter {saved_id!r}, "
                    "which none of its parameter groups lists"
                )
            p, group = owner[saved_id]
            if isinstance(saved_state, dict) and not saved_state:
                continue  # no state yet (torch's state_dict() keeps such entries)
            state[p] = _loaded_param_state(p, saved_state, group, f"parameter {saved_id}")
        self.__setstate__({"state": state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit states (bitsandbytes' ``AdamW8bit``): ``p *= 1 - lr * weight_decay``
    before the Adam update, as ``torch.optim.AdamW``. Arguments as ``Adam8bit``."""

    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, blocksize, min_8bit_size,
            decoupled_weight_decay=True, amsgrad=amsgrad, maximize=maximize,
            capturable=capturable, differentiable=differentiable, foreach=foreach, fused=fused,
        )  # fmt: skip


# --------------------------------------------------------------------------- updates


def _make_call(call) -> None:
    """One fused call of ``step``'s list: (group, hyperparameters, 8-bit?, its tensor lists)."""
    group, hyper, eight_bit, split = call
    if eight_bit:
        p, g, s1, s2, a1, a2, q1, q2, st, sk = split
        _step_8bit(
            p, g, s1, s2, a1, a2, q1[0], q2[0], st, sk, blocksize=group["blocksize"], **hyper,
        )  # fmt: skip
    else:
        _step_fp32_state(*split, **hyper)


def _hyperparameters_tensor(lr, beta1, beta2, eps, weight_decay) -> torch.Tensor:
    """float64 [5] on the CPU. Built by multiplying a tensor by each value, the form
    torch.compile turns into a graph input that follows the value (see ``lowprec::adam8bit_group_step_`` in ``_ops.py``)."""
    one = torch.ones((), dtype=torch.float64, device="cpu")
    values = [
        x.detach().to("cpu", torch.float64).reshape(()) if isinstance(x, torch.Tensor) else one * x
        for x in (lr, beta1, beta2, eps, weight_decay)
    ]
    return torch.stack(values)


def _eager_float(x) -> float:
    """A hyperparameter as a Python float, outside torch.compile: the float64 value the
    hyperparameter tensor of ``adam8bit_group_step_`` would carry."""
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _step_8bit(
    params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, skipped, *,
    lr, beta1, beta2, eps, weight_decay, decoupled, blocksize,
):  # fmt: skip
    """One fused op call for the 8-bit tensors of a group on one device."""
    # The kernels update p in place: a strided parameter goes through a contiguous copy.
    dense = [p if p.is_contiguous() else p.contiguous() for p in params]
    mutated = [*dense, *state1, *state2, *absmax1, *absmax2, *steps, *skipped]
    if _ops.plain_eager([*mutated, *grads, qmap1, qmap2]):
        # Straight to the kernel, hyperparameters as floats: the dispatcher's layers and the
        # hyperparameter tensor cost ~50 us per step, as much as stepping 1M parameters.
        floats = (_eager_float(x) for x in (lr, beta1, beta2, eps, weight_decay))
        _ops.route_mutating(
            "adam8bit_multi_step_", mutated, dense, grads, state1, state2, absmax1, absmax2,
            qmap1, qmap2, steps, skipped, *floats, decoupled, 1.0, blocksize,
        )  # fmt: skip
    else:
        hyperparameters = _hyperparameters_tensor(lr, beta1, beta2, eps, weight_decay)
        torch.ops.lowprec.adam8bit_group_step_(
            dense, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, skipped,
            hyperparameters, decoupled, blocksize,
        )  # fmt: skip
    for p, d in zip(params, dense):
        if d is not p:
            p.copy_(d)


def _step_fp32_state(
    params, grads, exp_avgs, exp_avg_sqs, steps, skipped, *,
    lr, beta1, beta2, eps, weight_decay, decoupled,
):  # fmt: skip
    """The same update with float32 m, v (tensors below ``min_8bit_size``) on one device: by
    ``lowprec::adam_multi_step_`` where a backend has a fused kernel for it (the CPU's, and
    Triton's on CUDA), else by the concatenated tensor ops of ``_step_fp32_state_concatenated``."""
    device_type = params[0].device.type
    states = [*exp_avgs, *exp_avg_sqs]
    if (
        _ops.plain_eager([*params, *grads, *states, *steps, *skipped])
        and _dispatch.kernel_for("adam_multi_step_", device_type)[0] != "reference"
        and all(t.is_contiguous() for t in states)
    ):
        # The kernel updates p in place: a strided parameter goes through a contiguous copy.
        dense = [p if p.is_contiguous() else p.contiguous() for p in params]
        floats = (_eager_float(x) for x in (lr, beta1, beta2, eps, weight_decay))
        _ops.route_mutating(
            "adam_multi_step_", [*dense, *states, *steps, *skipped], dense, grads, exp_avgs,
            exp_avg_sqs, steps, skipped, *floats, decoupled, 1.0,
        )  # fmt: skip
        for p, d in zip(params, dense):
            if d is not p:
                p.copy_(d)
        return
    _step_fp32_state_concatenated(
        params, grads, exp_avgs, exp_avg_sqs, steps, skipped, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, decoupled=decoupled,
    )  # fmt: skip


_tensor_sizes = TableCache()


def _sizes_on(sizes: list[int], device: torch.device) -> torch.Tensor:
    """The tensors' sizes as an int64 tensor on ``device``, for ``repeat_interleave``: cached
    per group layout in eager mode, so a step does not copy them from pageable memory (which
    would make the host wait for the kernels already queued, the backward pass among them)."""
    if not caching_allowed():
        return torch.tensor(sizes, device=device)
    return _tensor_sizes.get(
        (tuple(sizes), device_key(device)),
        lambda: to_device(torch.tensor(sizes, device="cpu"), device),
    )


def _step_fp32_state_concatenated(
    params, grads, exp_avgs, exp_avg_sqs, steps, skipped, *,
    lr, beta1, beta2, eps, weight_decay, decoupled,
):  # fmt: skip
    """``lowprec::adam_multi_step_``'s update in tensor ops: under torch.compile, on devices
    without a fused kernel for it (and under a forced ``reference`` backend), and for states
    that are not contiguous.

    All tensors are concatenated so a group costs a fixed number of kernels rather than a
    few dozen per tensor; per-tensor quantities (the update scalars of each tensor's own
    step, whether its gradient is finite) are repeated over its elements. The flattening,
    repeating and splitting back are single native calls: per-tensor Python work made this
    path cost ~45 us per tensor (a step over 1024 tensors of 1024 elements took 48 ms).
    """
    sizes = [p.numel() for p in params]
    p, g, m, v = (
        _flatten_dense_tensors(tensors).float()
        for tensors in (params, grads, exp_avgs, exp_avg_sqs)
    )
    # |g| summed in float64 is finite exactly when every element is (no float32 or half
    # input can overflow it): one multi-tensor reduction finds the non-finite gradients.
    finite = torch.stack(torch._foreach_norm(grads, 1, dtype=torch.float64)).isfinite()
    old_steps = torch.stack(steps)
    t = old_steps.to(torch.float64).trunc() + 1  # int(step) + 1, as the op reads it
    step_size, inv_sqrt_bc2 = (s.to(torch.float32) for s in update_scalars(lr, beta1, beta2, t))
    per_tensor = torch.stack([step_size, inv_sqrt_bc2, finite.to(torch.float32)], dim=1)
    repeats = _sizes_on(sizes, per_tensor.device)
    per_element = torch.repeat_interleave(per_tensor, repeats, dim=0, output_size=sum(sizes))
    step_size, inv_sqrt_bc2, keep = per_element[:, 0], per_element[:, 1], per_element[:, 2] != 0
    new_p, new_m, new_v = adam_update_corrected(
        p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, 1.0, step_size, inv_sqrt_bc2
    )
    for targets, new, old in ((params, new_p, p), (exp_avgs, new_m, m), (exp_avg_sqs, new_v, v)):
        kept = torch.where(keep, new, old)
        torch._foreach_copy_(targets, list(_unflatten_dense_tensors(kept, targets)))
    new_steps = torch.where(finite, t.to(torch.float32), old_steps)
    torch._foreach_copy_(steps, list(new_steps.unbind(0)))
    torch._foreach_add_(skipped, list((~finite).to(torch.float32).unbind(0)))


# --------------------------------------------------------------------------- loading


_COUNTERS = ("step", "skipped")


def _counts_as_numbers(counts: list[torch.Tensor]) -> list[int | float]:
    """One-element count tensors as Python numbers (int when whole), one read per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(counts):
        by_device[t.device].append(i)
    numbers: list[int | float] = [0] * len(counts)
    for device, indices in by_device.items():
        if device.type == "cpu":  # .item() is cheaper than stacking where no read waits
            read = [counts[i].item() for i in indices]
        else:
            read = torch.stack([counts[i].detach().reshape(()).float() for i in indices]).tolist()
        for i, value in zip(indices, read):
            numbers[i] = int(value) if float(value).is_integer() else value
    return numbers


def _scalar_count(value, where: str, name: str) -> float:
    """A step or skip count from a state dict: a number or a one-element tensor, >= 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{where}: {name} must hold one number, got shape {tuple(value.shape)}"
            )
        value = value.item()
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count_tensor(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def _loaded_param_state(p: torch.Tensor, saved, group: dict, where: str) -> dict:
    """A parameter's checked state from a state dict, as fresh tensors on p's device."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: state must be a dict, got {type(saved).__name__}")
    if isinstance(saved.get(_BNB_WRAPPED_STATE), dict):  # bitsandbytes 0.50 nests them
        saved = {**saved, **saved[_BNB_WRAPPED_STATE]}
    if "exp_avg" in saved and "state1" not in saved:
        raise ValueError(
            f"{where}: a torch.optim.Adam/AdamW state (exp_avg, exp_avg_sq), not an 8-bit "
            "optimizer's; converting one is not supported (a fresh 8-bit optimizer starts "
            "its states at zero)"
        )
    missing = [k for k in ("step", "state1", "state2") if k not in saved]
    if missing:
        raise ValueError(f"{where}: state lacks {missing}")
    for name in ("state1", "state2"):
        t = saved[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.numel() != p.numel():
            raise ValueError(
                f"{where}: {name} has {t.numel()} elements but the parameter has {p.numel()} "
                f"(shape {tuple(p.shape)}): the state dict is not of this model"
            )
    is_8bit = saved["state1"].dtype == torch.uint8
    for name in ("state1", "state2"):
        dtype = saved[name].dtype
        if (dtype == torch.uint8) != is_8bit or not (
            dtype == torch.uint8 or dtype.is_floating_point
        ):
            raise ValueError(
                f"{where}: state1 and state2 must both be uint8 codes or both float, got "
                f"{saved['state1'].dtype} and {saved['state2'].dtype}"
            )
    device = p.device

    def fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype, copy=True).reshape(p.shape)

    state = {
        "step": _count_tensor(_scalar_count(saved["step"], where, "step"), device),
        "skipped": _count_tensor(_scalar_count(saved.get("skipped", 0), where, "skipped"), device),
    }
    if not is_8bit:
        state["state1"] = fresh(saved["state1"], torch.float32)
        state["state2"] = fresh(saved["state2"], torch.float32)
        return state
    n_blocks = num_blocks(p.numel(), group["blocksize"])
    for name in ("absmax1", "absmax2"):
        t = saved.get(name)
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{where}: 8-bit state needs a float tensor {name}")
        if t.numel() != n_blocks:
            raise ValueError(
                f"{where}: {name} has {t.numel()} elements, expected {n_blocks} (one per block "
                f"of {group['blocksize']} of {p.numel()} elements)"
            )
    maps = _dynamic_maps(device)
    for name, expected, kind in zip(("qmap1", "qmap2"), maps, ("signed", "unsigned")):
        t = saved.get(name)
        if (
            not isinstance(t, torch.Tensor)
            or t.numel() != CODEBOOK_SIZE_8BIT
            or not torch.equal(t.detach().to("cpu", torch.float32).reshape(-1), expected.cpu())
        ):
            raise ValueError(f"{where}: {name} must be the {kind} 8-bit dynamic map")
    state["state1"] = fresh(saved["state1"], torch.uint8)
    state["state2"] = fresh(saved["state2"], torch.uint8)
    state["absmax1"] = saved["absmax1"].detach().to(device, torch.float32, copy=True).reshape(-1)
    state["absmax2"] = saved["absmax2"].detach().to(device, torch.float32, copy=True).reshape(-1)
    state["qmap1"], state["qmap2"] = maps
    return state


__all__ = ["Adam8bit", "AdamW8bit"]

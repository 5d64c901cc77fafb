"""``quantize_model``: swap a model's ``nn.Linear`` layers for quantized ones, in place."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lowprec_kernels.nn.linear4bit import Linear4bit
from lowprec_kernels.nn.linear8bit import Linear8bitLt

METHODS = ("nf4", "fp4", "int8")


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` equals ``name`` or its last dotted components (``lm_head`` ~ ``model.lm_head``)."""
    return name == pattern or name.endswith("." + pattern)


# Forward pre-hooks that recompute a Linear's weight from its reparametrization before each
# call (pruning, weight_norm, spectral_norm): the weight they last computed is what gets
# quantized, and they would overwrite the quantized weight, so they stay behind.
_WEIGHT_RECOMPUTING_HOOKS = (BasePruningMethod, WeightNorm, SpectralNorm)


def _calls_its_linears(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: a hook keeps ``nn.TransformerEncoderLayer`` off
    its fused inference path (``torch._transformer_encoder_layer_fwd``, taken in eval mode
    without gradients), which reads ``linear1.weight`` and ``linear2.weight`` as float
    matrices instead of calling the layers: quantized codes made it fail."""
    return None


def _keep_off_fused_paths(parent: nn.Module, child: str) -> None:
    """Once per module whose fused fast path reads the replaced Linear's weight directly."""
    if (
        isinstance(parent, nn.TransformerEncoderLayer)
        and child in ("linear1", "linear2")
        and _calls_its_linears not in parent._forward_pre_hooks.values()
    ):
        parent.register_forward_pre_hook(_calls_its_linears)


def _keep_encoders_off_nested_tensors(model: nn.Module) -> None:
    """An nn.TransformerEncoder turns a padded batch into a nested tensor for its layers'
    fused path (eval, no grad, a padding mask); layers kept off that path cannot take one."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            _calls_its_linears in layer._forward_pre_hooks.values() for layer in module.layers
        ):
            module.use_nested_tensor = False


def _adopt_hooks(new: nn.Module, old: nn.Linear) -> None:
    """``new`` takes ``old``'s training flag and its forward and backward hooks. It takes the
    hook dicts themselves, so the handles returned at registration still remove them. When
    weight-recomputing pre-hooks must stay behind, the forward pre-hook dicts are copied
    without them instead (``old`` keeps its own, untouched), and those handles no longer
    reach ``new``."""
    new.train(old.training)
    for name in (
        "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
        "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
        "_backward_hooks", "_is_full_backward_hook",
    ):  # fmt: skip
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]
    pre_hooks = old._forward_pre_hooks
    recomputing = {
        k for k, hook in pre_hooks.items() if isinstance(hook, _WEIGHT_RECOMPUTING_HOOKS)
    }
    if recomputing:
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            kept = type(old.__dict__[name])(
                (k, v) for k, v in old.__dict__[name].items() if k not in recomputing
            )
            new.__dict__[name] = kept


# The default skip; an entry of it that matches nothing is not worth a warning (a model
# without an lm_head), one the caller names is.
_DEFAULT_SKIP = ("lm_head",)


def _warn_unmatched_skips(model: nn.Module, skip: tuple, linear_names: list[str]) -> None:
    """Warns of each ``skip`` entry that keeps no Linear float: a typo, or a parent module's
    name (``"vision_tower"``), which keeps nothing inside it (the rule matches names)."""
    for pattern in skip:
        if any(_matches(name, pattern) for name in linear_names):
            continue
        other = next(
            (
                (name, type(module).__name__)
                for name, module in model.named_modules()
                if _matches(name, pattern)
            ),
            None,
        )
        if other is None:
            reason = "matches no module of the model"
        else:
            reason = (
                f"matches {other[0]!r}, a {other[1]}, not an nn.Linear (skip takes the "
                "Linears' own names or their last components: a parent's name keeps none of "
                "the Linears inside it float)"
            )
        warnings.warn(f"quantize_model: skip entry {pattern!r} {reason}", stacklevel=3)


def quantize_model(
    model: nn.Module, method: str = "nf4", skip: Iterable[str] = _DEFAULT_SKIP, **layer_kwargs
) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (except those matching ``skip``) in place.

    A ``skip`` entry matches a Linear's full name or its last components (``"lm_head"``
    matches ``model.lm_head``); an entry that keeps no Linear float (a typo, or a parent's
    name such as ``"vision_tower"``, which does not cover the Linears inside it) is warned
    about. Only modules whose type is exactly ``nn.Linear`` are replaced: subclasses (a
    library's own Linear, or ``nn.MultiheadAttention``'s ``out_proj``, whose weight the
    attention reads as a float matrix) stay float.

    ``method``: ``"nf4"`` / ``"fp4"`` (:class:`Linear4bit`) or ``"int8"``
    (:class:`Linear8bitLt`); ``layer_kwargs`` go to the layer's ``from_linear``. Layers whose
    ``in_features`` is not a multiple of the blocksize are quantized too (blocks then cross
    rows). Sharing is kept: a Linear used at several places becomes one quantized layer used
    at all of them (kept float everywhere if any of its names matches ``skip``), and Linears
    that share one weight share its quantized form (all stay float, still sharing it, if
    ``skip`` matches any of them). A quantized layer keeps its Linear's
    training flag and forward and backward hooks (their handles still remove them); the
    weight it quantizes is the Linear's current ``weight``. A pruned, weight_norm or
    spectral_norm Linear's recomputing pre-hooks stay behind (they would overwrite the
    quantized weight); its other forward pre-hooks are copied, so their handles then act on
    the replaced Linear only. An ``nn.TransformerEncoderLayer`` whose ``linear1`` or
    ``linear2`` is replaced gets a forward pre-hook that does nothing but keep torch's fused
    inference path (which would read the quantized weight as a float matrix) from running,
    and its ``nn.TransformerEncoder`` stops converting padded batches to nested tensors.
    Returns ``model``.
    """
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {METHODS}, got {method!r}")
    if type(model) is nn.Linear:
        raise ValueError(
            "quantize_model replaces the nn.Linear layers inside model, in place; a lone "
            "nn.Linear cannot be replaced in place: use Linear4bit.from_linear or "
            "Linear8bitLt.from_linear"
        )
    named = skip is not _DEFAULT_SKIP
    given = skip
    try:
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
    except TypeError:
        skip = None
    if skip is None or not all(isinstance(s, str) for s in skip):
        raise TypeError(
            "quantize_model: skip must be a module name or an iterable of names (() to skip "
            f"none), got {given!r}"
        )
    # Every place of every Linear (named_modules drops the repeated ones by default).
    places: dict[int, list[str]] = {}
    linears: dict[int, nn.Linear] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            places.setdefault(id(module), []).append(name)
            linears[id(module)] = module
    if named:
        _warn_unmatched_skips(model, skip, [n for names in places.values() for n in names])
    # A weight is kept float when any Linear holding it is skipped: quantizing the others
    # would untie it.
    skipped_weights = {
        id(linear.weight)
        for key, linear in linears.items()
        if any(_matches(name, s) for name in places[key] for s in skip)
    }
    # Every quantized layer is built before any is put in place: a Linear that cannot be
    # quantized (a float64 one, a keyword the layer does not take) leaves the model as it was.
    quantized_weights: dict[int, nn.Module] = {}  # id(float weight) -> its first quantized layer
    replacements: list[tuple[list[str], nn.Module]] = []
    for key, linear in linears.items():
        names = places[key]
        if id(linear.weight) in skipped_weights:
            continue
        try:
            if method == "int8":
                new = Linear8bitLt.from_linear(linear, **layer_kwargs)
            else:
                new = Linear4bit.from_linear(linear, quant_type=method, **layer_kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"quantize_model: cannot quantize {names[0]!r} ({linear.in_features} -> "
                f"{linear.out_features}, {linear.weight.dtype}); the model is unchanged: {err}"
            ) from err
        _adopt_hooks(new, linear)
        tied = quantized_weights.setdefault(id(linear.weight), new)
        if tied is not new:  # a weight shared with an earlier Linear: share its quantized form
            new.weight = tied.weight
            if method == "int8":
                new.SCB = tied.SCB
        replacements.append((names, new))
    for names, new in replacements:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            _keep_off_fused_paths(parent, child)
    _keep_encoders_off_nested_tensors(model)
    return model

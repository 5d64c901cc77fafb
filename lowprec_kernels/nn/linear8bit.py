"""``Linear8bitLt``: an LLM.int8 linear layer whose state_dict is bitsandbytes'.

The layer holds the int8 weight codes (``weight``, a frozen Parameter) and the fp32
per-output-row absmax (``SCB``, a buffer); its forward is the fused op ``int8_linear``, the
same in train and eval, with gradients to the input and the bias.
"""

from __future__ import annotations

import torch
from torch import nn

from lowprec_kernels import functional as LF
from lowprec_kernels._ops import _check_threshold, check_int8_linear
from lowprec_kernels.nn._checks import check_features

# bitsandbytes' ``weight_format`` entry: a uint8 scalar naming the weight's memory layout.
# Only row-major exists since bitsandbytes 0.45 (0 = "row"; the older tiled layouts are gone).
WEIGHT_FORMAT_ROW = 0
_WEIGHT_FORMAT_NAMES = {WEIGHT_FORMAT_ROW: "row"}


def _check_has_fp16_weights(owner: str, has_fp16_weights) -> None:
    """bitsandbytes' ``has_fp16_weights``: only its False (int8 codes) is this layer."""
    if has_fp16_weights is not False:
        raise ValueError(
            f"{owner}: has_fp16_weights must be False (the layer holds int8 codes, "
            f"bitsandbytes' inference layout), got {has_fp16_weights!r}; bitsandbytes' "
            "has_fp16_weights=True keeps a trainable 16-bit weight: use nn.Linear for that"
        )


class Linear8bitLt(nn.Linear):
    """LLM.int8 ``y = x @ W.T + b``: W stored as int8 per-row codes, outlier input columns
    (any ``|x| >= threshold``) computed in x's dtype; the output has x's dtype.

    An ``nn.Linear`` (as bitsandbytes' layer is) whose ``weight`` holds the codes.
    ``Linear8bitLt(in_features, out_features)`` initializes W as ``nn.Linear`` does and
    quantizes it; :meth:`from_linear` quantizes an existing layer's weight as given (no
    fp16 rounding first). ``threshold=0`` turns the outlier decomposition off.
    ``has_fp16_weights=False`` is accepted for bitsandbytes' arguments to carry over (its
    ``True``, a trainable 16-bit weight, is refused).

    state_dict: ``weight`` (int8), ``bias``, ``SCB`` (fp32 row absmax) and ``weight_format``
    (uint8 0 = row-major), as bitsandbytes' ``Linear8bitLt`` writes them: each loads the
    other's checkpoints. A floating-point ``weight`` without ``SCB`` (an ``nn.Linear``
    checkpoint) is quantized on load.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        device=None,
        dtype: torch.dtype | None = None,
        *,
        has_fp16_weights: bool = False,
    ) -> None:
        _check_has_fp16_weights("Linear8bitLt", has_fp16_weights)
        check_features("Linear8bitLt", in_features, out_features)
        _check_threshold("Linear8bitLt", threshold)
        # nn.Linear's initialization, quantized: a fresh layer behaves like a fresh nn.Linear.
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.threshold = float(threshold)
        self._quantize_float_weight()

    def _quantize_float_weight(self) -> None:
        """Replaces the float ``weight`` by its int8 codes, frozen, and sets ``SCB``."""
        weight, scb = LF.int8_quantize_weight(self.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("SCB", scb)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialization; on a quantized layer, re-initialized and requantized
        (in the float dtype of the bias, float32 without one)."""
        if self.weight.is_floating_point():  # nn.Linear.__init__, before quantization
            super().reset_parameters()
            return
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        shape = (self.out_features, self.in_features)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=self.weight.device))
        super().reset_parameters()
        self._quantize_float_weight()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: float = 6.0, *, has_fp16_weights: bool = False
    ) -> Linear8bitLt:
        """A layer holding ``linear``'s weight quantized as given and a copy of its bias
        (``has_fp16_weights`` as the constructor's)."""
        _check_has_fp16_weights("Linear8bitLt.from_linear", has_fp16_weights)
        weight = linear.weight
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            raise TypeError(
                "Linear8bitLt.from_linear: linear.weight must be a floating-point tensor, got "
                f"{getattr(weight, 'dtype', type(weight).__name__)}; int8 codes need their "
                "scales: use Linear8bitLt.from_quantized(weight, SCB, bias)"
            )
        if weight.dim() == 2:  # (other shapes: the op names W)
            check_features("Linear8bitLt.from_linear", weight.shape[1], weight.shape[0])
        weight_q, scb = LF.int8_quantize_weight(weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls.from_quantized(weight_q, scb, bias, threshold)
        if layer.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        SCB: torch.Tensor | None,  # noqa: N803 - bitsandbytes' name
        bias: torch.Tensor | None = None,
        threshold: float = 6.0,
    ) -> Linear8bitLt:
        """A layer around int8 codes ``weight`` [out, in] and their fp32 row scales ``SCB``
        (bitsandbytes' names); the layer shares their storage."""
        if SCB is None:
            raise ValueError(
                "Linear8bitLt.from_quantized: SCB (the per-row scales of the int8 weight) "
                "is required"
            )
        # The op's own checker names the argument that is wrong (weight, weight_scale, bias,
        # threshold); a batch of no rows stands in for x.
        is_2d = isinstance(weight, torch.Tensor) and weight.dim() == 2
        no_rows = torch.empty(
            0, weight.shape[1] if is_2d else 0, device=getattr(weight, "device", None)
        )
        check_int8_linear(no_rows, weight, SCB, bias, threshold)
        layer = cls(
            weight.shape[1], weight.shape[0], bias=False, threshold=threshold, device="meta"
        )
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.SCB = SCB
        if bias is not None:
            layer.bias = nn.Parameter(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LF.int8_linear(x, self.weight, self.SCB, self.bias, self.threshold)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )

    # --- dtype/device moves: the codes and their scales keep their dtypes ------------------

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast floating buffers: SCB must stay fp32 (the format),
        # so it only follows the move's device. The int8 weight is not floating: untouched.
        scb = self._buffers["SCB"]
        self._buffers["SCB"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["SCB"] = scb
        if scb is not None:
            moved = fn(scb)
            self._buffers["SCB"] = moved if moved.dtype == scb.dtype else scb.to(moved.device)
        return self

    # --- state_dict: bitsandbytes' keys ----------------------------------------------------

    @property
    def weight_format(self) -> torch.Tensor:
        """The state dict's ``weight_format`` entry (also an attribute, as
        torch.distributed.checkpoint resolves state-dict keys as attribute paths)."""
        return torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_format"] = self.weight_format

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        keys = {name: prefix + name for name in ("weight", "SCB", "weight_format")}
        problem = self._checkpoint_problem(state_dict, **keys)
        if problem is not None:
            # Reported (and raised by load_state_dict) even with strict=False: codes without
            # their scales would be silent garbage. Nothing of this layer is loaded.
            error_msgs.append(f"{type(self).__name__}: {problem}")
            return
        weight = state_dict.get(keys["weight"])
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            # load_state_dict(assign=True) takes the state dict's device (a layer built on the
            # meta device is filled this way); a copying load, the layer's.
            assign = local_metadata.get("assign_to_params_buffers", False)
            weight_q, scb = LF.int8_quantize_weight(
                weight if assign else weight.to(self.SCB.device)
            )
            state_dict = {**state_dict, keys["weight"]: weight_q, keys["SCB"]: scb}
        scb = state_dict.get(keys["SCB"])
        if isinstance(scb, torch.Tensor) and scb.dtype != torch.float32:
            # A copying load casts into the fp32 buffer anyway; load_state_dict(assign=True)
            # would keep a half SCB, which int8_linear refuses at the first forward.
            state_dict = {**state_dict, keys["SCB"]: scb.float()}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if keys["weight_format"] in unexpected_keys:
            unexpected_keys.remove(keys["weight_format"])

    def _checkpoint_problem(self, state_dict, weight, SCB, weight_format) -> str | None:  # noqa: N803
        """What is wrong with this layer's entries of ``state_dict`` (given their keys), or None."""
        if weight_format in state_dict:
            fmt = state_dict[weight_format]
            fmt = fmt.item() if isinstance(fmt, torch.Tensor) else fmt
            if fmt not in _WEIGHT_FORMAT_NAMES and fmt not in _WEIGHT_FORMAT_NAMES.values():
                return (
                    f"{weight_format} must be {WEIGHT_FORMAT_ROW} (row-major, the only layout "
                    f"bitsandbytes still writes), got {fmt!r}"
                )
        w, scb = state_dict.get(weight), state_dict.get(SCB)
        if w is None:
            return None if scb is None else f"{SCB} is given without {weight} (its int8 codes)"
        if w.is_floating_point():
            if scb is not None:
                return (
                    f"{weight} is floating point but {SCB} is given too; SCB belongs to int8 "
                    "codes (a floating-point weight is quantized on load)"
                )
        elif w.dtype != torch.int8:
            return (
                f"{weight} must be int8 codes (with {SCB}) or a floating-point weight to "
                f"quantize, got {w.dtype}"
            )
        elif scb is None:
            return f"{weight} holds int8 codes but {SCB} (their per-row scales) is missing"
        if w.shape != self.weight.shape:
            return (
                f"{weight} must be 2-D with shape {tuple(self.weight.shape)} "
                f"[out_features, in_features], got {tuple(w.shape)}"
            )
        if scb is not None and not scb.is_floating_point():
            return f"{SCB} must be floating point (fp32 per-row scales), got {scb.dtype}"
        if scb is not None and scb.shape != (self.weight.shape[0],):
            return (
                f"{SCB} must have shape ({self.weight.shape[0]},) (one scale per output row), "
                f"got {tuple(scb.shape)}"
            )
        return None

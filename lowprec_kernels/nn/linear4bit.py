"""``Linear4bit``: ``nn.Linear`` with its weight stored as NF4 / FP4 codes (QLoRA).

The weight is a :class:`Params4bit`: a frozen ``nn.Parameter`` holding the packed codes
(``uint8 [(n+1)//2, 1]``) with their :class:`~lowprec_kernels.QuantState` as
``.quant_state``, as bitsandbytes' ``Params4bit``. The forward pass is the fused op
``matmul_4bit``; gradients reach the input and the bias, never the weight (QLoRA).

State dicts use bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4`` / ``__fp4``, ``bias``): plain tensors only, so they
load with ``torch.load(weights_only=True)`` and through safetensors, and a state dict written
by bitsandbytes' ``Linear4bit`` loads here (with any ``quant_storage``: the codes' bytes are
read as uint8, and saved as uint8).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from lowprec_kernels import functional as LF
from lowprec_kernels._ops import FLOAT_DTYPES, check_4bit_weight
from lowprec_kernels.nn._checks import check_features
from lowprec_kernels.quant_state import PACKED_KEY_PREFIX, QuantState, is_dict_key


def _rebuild_params4bit(data, requires_grad, quant_state):
    return Params4bit(data, requires_grad, quant_state)


class Params4bit(nn.Parameter):
    """Packed 4-bit codes (``uint8 [(n+1)//2, 1]``) with their ``quant_state``; frozen.

    ``.to(device)`` / ``.cuda()`` / ``.cpu()`` move the codes and the QuantState together;
    the codes never change dtype (``nn.Module.to(dtype)`` leaves non-float tensors alone; a
    direct ``.to(float_dtype)`` raises: use :meth:`dequantize`). ``copy.deepcopy`` and
    ``pickle`` keep the type and the QuantState. bitsandbytes' attribute names
    (``blocksize``, ``quant_type``, ``compress_statistics``, ``quant_storage``,
    ``bnb_quantized``) read the QuantState.
    """

    quant_state: QuantState | None

    def __new__(cls, data=None, requires_grad=False, quant_state=None):
        if data is None:
            data = torch.empty(0, dtype=torch.uint8)
        if data.is_floating_point():  # bitsandbytes' Params4bit(w) quantizes on .to(device)
            raise TypeError(
                f"Params4bit holds packed uint8 codes, got {data.dtype} data: quantize a float "
                "weight with Params4bit.from_weight(w, blocksize, quant_type, double_quant)"
            )
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.quant_state = quant_state
        return self

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
    ) -> Params4bit:
        """Quantizes a float weight of any shape."""
        with torch.no_grad():
            packed, state = LF.quantize_4bit(weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, requires_grad=False, quant_state=state)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight, in ``dtype`` (default: the original weight's dtype)."""
        return LF.dequantize_4bit(self.data, self.quant_state, dtype)

    # bitsandbytes' Params4bit keeps its settings as attributes beside its quant_state; code
    # written for it reads them. Here the quant_state is their one source, so they are read-only
    # views of it (None before there is one).
    @property
    def blocksize(self) -> int | None:
        return None if self.quant_state is None else self.quant_state.blocksize

    @property
    def quant_type(self) -> str | None:
        return None if self.quant_state is None else self.quant_state.quant_type

    @property
    def compress_statistics(self) -> bool | None:
        """bitsandbytes' name for double quantization."""
        return None if self.quant_state is None else self.quant_state.nested

    @property
    def quant_storage(self) -> torch.dtype:
        return self.dtype

    @property
    def bnb_quantized(self) -> bool:
        return self.quant_state is not None

    def to(self, *args, **kwargs) -> Params4bit:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != torch.uint8:
            raise TypeError(
                f"Params4bit.to: the packed 4-bit codes stay uint8, got dtype={dtype}; "
                "use .dequantize(dtype) for a float weight"
            )
        if device is None:
            return self
        data = self.data.to(device=device, non_blocking=non_blocking)
        if data.device == self.device:
            return self
        state = None if self.quant_state is None else self.quant_state.to(data.device)
        return Params4bit(data, self.requires_grad, state)

    def detach(self) -> Params4bit:
        # A Params4bit stays one when detached: nn.Parameter(...) of it (nn.Module._apply's
        # path for a move to another tensor type, e.g. to "meta", or with swap_tensors)
        # requires it.
        return Params4bit(super().detach(), False, self.quant_state)

    def cuda(self, device=None, non_blocking: bool = False) -> Params4bit:
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self) -> Params4bit:
        return self.to("cpu")

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = Params4bit(
                self.data.clone(memory_format=torch.preserve_format),
                self.requires_grad,
                copy.deepcopy(self.quant_state, memo),
            )
        return memo[id(self)]

    def __reduce_ex__(self, proto):
        # nn.Parameter's own reduce rebuilds a plain Parameter: keep the type.
        return _rebuild_params4bit, (self.data, self.requires_grad, self.quant_state)


class _ParameterSlots(dict):
    """A Linear4bit's ``_parameters``: a dict that also notes the shape, dtype and quant_state
    of the last Params4bit stored under ``weight`` (``packed``), whichever way it got there
    (``setattr``, ``register_parameter``, ``_parameters[...] =`` as accelerate and FSDP2 do,
    ``_apply``). Some callers put plain tensors holding the same codes in its place: FSDP2
    all-gathers a sharded weight into a plain Parameter, torch.export swaps in fake tensors.
    The layer decodes those with the noted quant_state. Only the quant_state is kept, not the
    codes (an FSDP2-sharded layer does not hold its whole codes); deleting the weight drops
    it. Pickled as a plain dict: the layer wraps it again on load."""

    packed: tuple[torch.Size, torch.dtype, QuantState] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.note(self.get("weight"))

    def note(self, weight) -> None:
        if isinstance(weight, Params4bit) and weight.quant_state is not None:
            self.packed = (weight.shape, weight.dtype, weight.quant_state)
        elif weight is None:
            self.packed = None

    def stands_in(self, weight) -> bool:
        """Whether ``weight`` has the noted codes' shape and dtype (a plain tensor in their
        place is decoded with the noted quant_state)."""
        return (
            self.packed is not None
            and isinstance(weight, torch.Tensor)
            and (weight.shape, weight.dtype) == self.packed[:2]
        )

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key == "weight":
            self.note(value)

    def __delitem__(self, key):
        super().__delitem__(key)
        if key == "weight":
            self.packed = None

    def __reduce__(self):
        return (dict, (dict(self),))


def _double_quant(owner: str, double_quant: bool, compress_statistics, quant_storage) -> bool:
    """``double_quant`` given bitsandbytes' arguments: its ``compress_statistics`` (the same
    setting) decides when given, and its ``quant_storage`` must be the bytes this layer
    keeps."""
    if compress_statistics is not None:
        if compress_statistics and double_quant is False:
            raise ValueError(
                f"{owner}: compress_statistics (bitsandbytes' name for double_quant) is "
                f"{compress_statistics!r} but double_quant is {double_quant!r}"
            )
        double_quant = bool(compress_statistics)
    if quant_storage != torch.uint8:
        raise ValueError(
            f"{owner}: quant_storage must be torch.uint8, got {quant_storage!r} (the codes "
            "are stored as bytes; checkpoints storing them in another dtype load)"
        )
    return double_quant


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped and is_wrapped(t))


class Linear4bit(nn.Linear):
    """``y = x @ W.T + bias`` with W stored as 4-bit NF4 / FP4 codes, blockwise scales.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: ``None`` computes in the input's dtype; a float dtype casts x (and
            the bias) to it and casts the output back to the input's dtype. Under
            ``torch.autocast`` the op computes in the autocast dtype (as ``F.linear``); with
            ``compute_dtype=None`` the output then has the autocast dtype.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: elements per absmax block (32 .. 4096, powers of two).
        double_quant: store the block absmax values as 8-bit codes (4.127 bits per weight).
        device, dtype: where the layer lives and the float dtype it is initialized in (the
            QuantState's dtype, i.e. what ``weight.dequantize()`` returns, and the bias').
        compress_statistics, quant_storage: bitsandbytes' names, so that its arguments carry
            over: ``compress_statistics`` is ``double_quant`` under bitsandbytes' name and
            decides when given (ValueError if ``double_quant=False`` contradicts it);
            ``quant_storage`` must be ``torch.uint8`` (checkpoints that store the codes in
            another dtype's bytes load all the same).

    A constructed layer is initialized exactly as ``nn.Linear`` and quantized at
    construction (our kernels run on CPU, so there is no need to wait for ``.to("cuda")``
    as bitsandbytes does). Loading a float ``nn.Linear`` state dict quantizes its weight
    with this layer's settings; loading a quantized one takes its settings.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        device=None,
        dtype: torch.dtype | None = None,
        *,
        compress_statistics: bool | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ):
        double_quant = _double_quant("Linear4bit", double_quant, compress_statistics, quant_storage)
        check_features("Linear4bit", in_features, out_features)
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(
                "Linear4bit: compute_dtype must be None, torch.float32, torch.float16 or "
                f"torch.bfloat16, got {compute_dtype!r}"
            )
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._parameters = _ParameterSlots(self._parameters)
        self.compute_dtype = compute_dtype
        self.weight = Params4bit.from_weight(self.weight, blocksize, quant_type, double_quant)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        *,
        compress_statistics: bool | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> Linear4bit:
        """A Linear4bit holding ``linear``'s weight quantized and a copy of its bias.

        The layer lives on ``linear``'s device; its QuantState dtype is ``linear``'s weight
        dtype. ``linear`` is not modified. Arguments as the constructor's.
        """
        double_quant = _double_quant(
            "Linear4bit.from_linear", double_quant, compress_statistics, quant_storage
        )
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"Linear4bit.from_linear: linear must be an nn.Linear, got {type(linear).__name__}"
            )
        if not linear.weight.is_floating_point():  # e.g. a Linear8bitLt's int8 codes
            raise TypeError(
                "Linear4bit.from_linear: linear.weight must be a floating-point tensor, got "
                f"{linear.weight.dtype} (of a {type(linear).__name__})"
            )
        # Built on the meta device (no init work, no memory), then given the real tensors.
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, quant_type=quant_type, blocksize=blocksize,
            double_quant=double_quant, device="meta", dtype=linear.weight.dtype,
        )  # fmt: skip
        layer.weight = Params4bit.from_weight(linear.weight, blocksize, quant_type, double_quant)
        if linear.bias is not None:
            layer.bias = nn.Parameter(
                linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad
            )
        return layer

    # --- quantization settings, read from the weight's QuantState --------------------------

    @property
    def quant_state(self) -> QuantState:
        # Through _quant_state_for: a plain tensor of the codes (FSDP2's gathered weight, its
        # sharded DTensor, torch.export's fake one) has no quant_state of its own. (A TypeError,
        # not an AttributeError, which nn.Module.__getattr__ would turn into a misleading one.)
        return self._quant_state_for(self.weight)

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def double_quant(self) -> bool:
        return self.quant_state.nested

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialization; on a quantized layer, re-initialized and requantized."""
        weight = self.weight
        if not isinstance(weight, Params4bit):  # nn.Linear.__init__, before quantization
            super().reset_parameters()
            return
        st = weight.quant_state
        shape = (self.out_features, self.in_features)
        self.weight = nn.Parameter(torch.empty(shape, dtype=st.dtype, device=weight.device))
        super().reset_parameters()
        self.weight = Params4bit.from_weight(self.weight, st.blocksize, st.quant_type, st.nested)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_packed_weight", None)  # a pickle of 2026-11-29's first version
        if not isinstance(self._parameters, _ParameterSlots):
            self._parameters = _ParameterSlots(self._parameters)

    def _quant_state_for(self, weight: torch.Tensor) -> QuantState:
        """The quant_state that decodes ``weight``: its own for a Params4bit; for a plain
        tensor of the packed codes' shape and dtype standing in for them (FSDP2's gathered
        weight, torch.export's fake one), that of the last Params4bit the layer held."""
        if isinstance(weight, Params4bit):
            self._note_packed(weight)  # its quant_state may have been replaced
            return weight.quant_state
        slots = self._parameters
        if (
            isinstance(slots, _ParameterSlots)
            and slots.stands_in(weight)
            and not _is_functorch_wrapped(weight)
        ):
            return slots.packed[2]
        raise TypeError(
            f"{type(self).__name__}: weight must be a Params4bit (packed codes with their "
            f"quant_state) or a plain tensor of its codes, got {type(weight).__name__} "
            f"{tuple(getattr(weight, 'shape', ()))}; under torch.func transforms (vmap over "
            "stacked layers) the layers' quant_states are not stacked: call each layer"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        state = self._quant_state_for(weight)
        # The op gets a plain-Tensor alias of the codes: make_fx (and torch.func.linearize,
        # which traces with it) refuses a Parameter subclass it meets as a constant. Dynamo
        # traces the Params4bit itself; an as_subclass there sent it into a kernel's Python.
        codes = weight if torch.compiler.is_compiling() else weight.as_subclass(torch.Tensor)
        # A non-float x is passed on uncast, so the op rejects it with its own clear error.
        cast = self.compute_dtype is not None and x.is_floating_point()
        x_compute = x.to(self.compute_dtype) if cast else x
        bias = self.bias
        if bias is not None and x_compute.is_floating_point():
            bias = bias.to(x_compute.dtype)
        y = LF.matmul_4bit(x_compute, codes, state, bias)
        return y.to(x.dtype) if cast else y

    def extra_repr(self) -> str:
        try:
            st = self.quant_state
        except TypeError:  # a weight that is no longer the codes (a float one put in its place)
            weight = self.weight
            return (
                f"{super().extra_repr()}, weight={type(weight).__name__} "
                f"{getattr(weight, 'dtype', None)} (not quantized codes), "
                f"compute_dtype={self.compute_dtype}"
            )
        return (
            f"{super().extra_repr()}, quant_type={st.quant_type}, blocksize={st.blocksize}, "
            f"double_quant={st.nested}, compute_dtype={self.compute_dtype}"
        )

    # --- device / dtype moves -------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # nn.Module._apply swaps only the weight's data (param.data = fn(param)), which leaves
        # the QuantState behind: move it to wherever the codes went. Where the swap is not
        # possible (to_empty from the meta device) it stores fn's result as a plain
        # Parameter: the codes become a Params4bit again, with the noted QuantState.
        super()._apply(fn, recurse)
        weight = self.weight
        slots = self._parameters
        if (
            type(weight) is nn.Parameter  # not a DTensor (FSDP2's sharded codes)
            and isinstance(slots, _ParameterSlots)
            and slots.stands_in(weight)
        ):
            weight = Params4bit(weight.data, weight.requires_grad, slots.packed[2])
            self.weight = weight
        state = getattr(weight, "quant_state", None)
        if state is not None and state.absmax.device != weight.device:
            # Codes that left the meta device came through to_empty (.to raises there).
            move = state.to_empty if state.absmax.is_meta else state.to
            weight.quant_state = move(weight.device)
        self._note_packed(weight)
        return self

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch.distributed.checkpoint's state_dict API resolves each key as an attribute
        path from the layer (``weight.absmax`` -> ``getattr(weight, "absmax")``). Neither the
        codes (a Params4bit, FSDP2's sharded DTensor) nor the QuantState has those attributes,
        so the path is looked up on ``_checkpoint_paths`` instead (this method is that API's
        contract for it)."""
        return {"weight": "_checkpoint_paths"}

    @property
    def _checkpoint_paths(self) -> SimpleNamespace:
        """``weight`` with an attribute path for each state-dict key under it
        (``quant_state.bitsandbytes__nf4`` two levels down)."""
        weight = SimpleNamespace()
        for key, value in self.quant_state.as_dict().items():
            *parents, leaf = key.split(".")
            node = weight
            for part in parents:
                node = node.__dict__.setdefault(part, SimpleNamespace())
            setattr(node, leaf, value)
        return SimpleNamespace(weight=weight)

    def _note_packed(self, weight) -> None:
        """Lets the parameter dict note ``weight``'s quant_state (it is a plain dict until
        __init__ or __setstate__ installs the _ParameterSlots)."""
        if isinstance(self._parameters, _ParameterSlots):
            self._parameters.note(weight)

    # --- state dict (bitsandbytes' layout) ------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (codes), bias
        weight = self.weight
        if not keep_vars and isinstance(weight, Params4bit):
            # A plain tensor, as torch.load(weights_only=True) requires. (A stand-in for the
            # codes, FSDP2's sharded DTensor say, is saved as it is.)
            destination[prefix + "weight"] = weight.as_subclass(torch.Tensor).detach()
        for key, value in self._quant_state_for(weight).as_dict().items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ):  # fmt: skip
        weight_key = prefix + "weight"
        weight = state_dict.get(weight_key)
        if weight is not None:
            # load_state_dict(assign=True): the state dict's tensors become the layer's, on
            # their device (a layer built on the meta device is filled this way).
            assign = local_metadata.get("assign_to_params_buffers", False)
            loaded = self._weight_from_state_dict(weight, state_dict, weight_key, assign)
            current = self.weight
            if not assign and isinstance(current, Params4bit) and _same_layout(current, loaded):
                # Into the Params4bit itself, as nn.Module copies into its parameters: a weight
                # that several layers share (tied) stays shared, one copy in memory.
                with torch.no_grad():
                    current.copy_(loaded)
                current.quant_state = loaded.quant_state
                self._note_packed(current)
            else:
                shared = loaded.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
                if not assign and shared:  # copies, as nn.Module's own loading copies
                    loaded = Params4bit(loaded.data.clone(), False, loaded.quant_state)
                self.weight = loaded

        # nn.Module loads the bias; the weight and the "weight.*" entries of its QuantState
        # (consumed above) are hidden from it. Any other key, and every "weight.*" entry
        # when the weight itself is absent, is left to be reported.
        def consumed(key):
            if key == weight_key:
                return True
            entry = key[len(weight_key) + 1 :]
            return weight is not None and key.startswith(weight_key + ".") and is_dict_key(entry)

        rest = {k: v for k, v in state_dict.items() if not consumed(k)}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight is not None and weight_key in missing_keys:
            missing_keys.remove(weight_key)
        state = getattr(self.weight, "quant_state", None)
        if weight is None and state is not None:  # the weight's entries are missing with it
            missing_keys.extend(
                key
                for key in (f"{weight_key}.{name}" for name in state.dict_keys())
                if key not in state_dict
            )

    def _weight_from_state_dict(self, weight, state_dict, weight_key, assign) -> Params4bit:
        name = type(self).__name__
        shape = (self.out_features, self.in_features)
        device = weight.device if assign else self.weight.device
        state_prefix = weight_key + "."
        entries = {
            k[len(state_prefix) :]: v for k, v in state_dict.items() if k.startswith(state_prefix)
        }
        if weight.is_floating_point() and not entries:  # an nn.Linear checkpoint: quantize it
            if tuple(weight.shape) != shape:
                raise ValueError(
                    f"{name}: float '{weight_key}' must have shape {shape}, got {tuple(weight.shape)}"
                )
            st = self.quant_state
            return Params4bit.from_weight(
                weight.to(device=device, dtype=st.dtype), st.blocksize, st.quant_type, st.nested
            )
        required = ["absmax", "quant_map"]
        absmax = entries.get("absmax")
        if isinstance(absmax, torch.Tensor) and absmax.dtype == torch.uint8:  # double quant
            required += ["nested_absmax", "nested_quant_map"]
        missing = [state_prefix + k for k in required if k not in entries]
        if not any(k.startswith(PACKED_KEY_PREFIX) for k in entries):
            missing.append(state_prefix + PACKED_KEY_PREFIX + "nf4 (or fp4)")
        if missing:
            raise ValueError(
                f"{name}: the state dict lacks {missing}, needed to load the quantized "
                f"'{weight_key}' (a truncated checkpoint?)"
            )
        if not assign:  # copies, as nn.Module's own loading copies
            entries = {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entries.items()
            }
        st = QuantState.from_dict(entries, device=device)
        if tuple(st.shape) != shape:
            raise ValueError(
                f"{name}: '{weight_key}' holds a quantized weight of shape {list(st.shape)}, "
                f"this layer needs {list(shape)}"
            )
        # bitsandbytes' quant_storage (FSDP-QLoRA stores the packed bytes as bf16, say): the
        # same bytes in wider elements; its kernels read them as uint8, and so do we.
        stored = weight.dtype
        if stored != torch.uint8 and weight.numel() > 0:
            weight = weight.contiguous().reshape(-1).view(torch.uint8)
        if weight.numel() != (st.numel + 1) // 2:
            raise ValueError(
                f"{name}: '{weight_key}' must hold {(st.numel + 1) // 2} bytes (two 4-bit codes "
                f"each), got {weight.numel()} (as {stored})"
            )
        codes = weight.to(device).reshape(-1, 1)
        # Checked as the ops check them, so that a malformed checkpoint (absmax of another dtype
        # or layout, a short quant_map) fails here, not in the first forward or, where only
        # the layout differs, never. (The op's names: code is the state dict's quant_map.)
        check_4bit_weight(f"{name}: loading '{weight_key}'", codes, *st.op_args())
        # Not copied here: the caller copies them into its Params4bit, or clones them.
        return Params4bit(codes, False, st)

"""``QuantState``: everything needed to decode a 4-bit weight, in bitsandbytes' layout.

``as_dict()`` gives bitsandbytes' packed form (``as_dict(packed=True)`` there): tensors only,
the scalars packed as UTF-8 JSON into a uint8 tensor under
``quant_state.bitsandbytes__<quant_type>``, so a state dict loads with
``torch.load(weights_only=True)`` and safetensors, here and in bitsandbytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from lowprec_kernels._ops import FLOAT_DTYPES
from lowprec_kernels.reference.codebooks import QUANT_TYPES_4BIT

NESTED_BLOCKSIZE = 256  # double quantization's blocksize (bitsandbytes' choice)

PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def is_dict_key(name: str) -> bool:
    """Whether ``name`` is a key of ``QuantState.as_dict()`` (a tensor or the packed header)."""
    return name in TENSOR_KEYS or name.startswith(PACKED_KEY_PREFIX)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name, key: str) -> torch.dtype:
    """A header's dtype: its name ("bfloat16", or "torch.bfloat16") or, in an unpacked dict,
    the torch.dtype itself."""
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"QuantState.from_dict: {key} must be a torch.dtype or its name, got {name!r}"
        )
    return dtype


def _offset_from_header(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"QuantState.from_dict: nested_offset must be a number, got {value!r}"
        ) from None


class QuantState:
    """Scales, codebook and metadata of a 4-bit quantized tensor (NF4 or FP4).

    ``absmax`` is float32 per block, or with double quantization uint8 codes decoded as
    ``nested_code[absmax] * nested_absmax[i // nested_blocksize] + offset``.
    """

    def __init__(
        self,
        *,
        quant_type: str,
        blocksize: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        absmax: torch.Tensor,
        code: torch.Tensor,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        nested_blocksize: int = NESTED_BLOCKSIZE,
        offset: torch.Tensor | float | None = None,
    ):
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(
                f"QuantState: quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}"
            )
        if dtype not in FLOAT_DTYPES:
            raise TypeError(
                "QuantState: dtype must be torch.float32, torch.float16 or torch.bfloat16 (the "
                f"weight's, which dequantize_4bit returns), got {dtype!r}"
            )
        nested = (nested_absmax, nested_code, offset)
        if any(t is not None for t in nested) and not all(t is not None for t in nested):
            raise ValueError(
                "QuantState: double quantization needs nested_absmax, nested_code and offset together"
            )
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.absmax = absmax
        self.code = code
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_blocksize = int(nested_blocksize)
        if offset is not None and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
        self.offset = offset

    @property
    def nested(self) -> bool:
        """True when the block scales are double-quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def op_args(self) -> tuple:
        """The weight-describing arguments of the ``lowprec`` 4-bit ops, in schema order."""
        return (
            self.absmax,
            self.code,
            self.blocksize,
            list(self.shape),
            self.nested_absmax,
            self.nested_code,
            self.offset,
            self.nested_blocksize,
        )

    def to(self, device) -> QuantState:
        """A copy with every tensor on ``device`` (bitsandbytes' ``QuantState.to`` moves its own
        tensors and returns None: here, use the result)."""
        return self._map_tensors(lambda t: t.to(device))

    def to_empty(self, device) -> QuantState:
        """A state of the same layout with uninitialized tensors on ``device``, as
        ``nn.Module.to_empty`` gives parameters (from the meta device, say)."""
        return self._map_tensors(lambda t: torch.empty_like(t, device=device))

    def _map_tensors(self, fn) -> QuantState:
        def move(t):
            return None if t is None else fn(t)

        return QuantState(
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            shape=self.shape,
            dtype=self.dtype,
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            nested_blocksize=self.nested_blocksize,
            offset=move(self.offset),
        )

    def dict_keys(self) -> list[str]:
        """The keys of ``as_dict()``, without reading any tensor."""
        keys = list(TENSOR_KEYS if self.nested else TENSOR_KEYS[:2])
        return keys + [PACKED_KEY_PREFIX + self.quant_type]

    def as_dict(self, packed: bool = True) -> dict:
        """bitsandbytes' packed dict: tensors only, scalars in a JSON uint8 tensor. With
        ``packed=False``, its unpacked form (the scalars as Python values, as bitsandbytes'
        ``as_dict(packed=False)``); ``from_dict`` reads both.

        The header tensor is built once per header text and then reused, so that layers
        sharing this state (tied weights) share their state dict entries, as safetensors'
        ``save_model`` needs to store them once. On the meta device the header is a meta
        tensor too, its length a placeholder (the offset has no value there)."""
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        header = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        on_meta = self.absmax.is_meta
        if self.nested:
            tensors["nested_absmax"] = self.nested_absmax
            tensors["nested_quant_map"] = self.nested_code
            header.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype=_dtype_name(torch.float32),
                nested_offset=0.0 if self.offset.is_meta else float(self.offset.item()),
            )
            on_meta = on_meta or self.offset.is_meta
        if not packed:
            return {**header, **tensors}
        text = json.dumps(header)
        cached = getattr(self, "_packed_header", None)
        if cached is None or cached[0] != (text, on_meta):
            data = list(text.encode("utf-8"))
            if on_meta:
                blob = torch.empty(len(data), dtype=torch.uint8, device="meta")
            else:
                blob = torch.tensor(data, dtype=torch.uint8, device="cpu")
            self._packed_header = cached = ((text, on_meta), blob)
        tensors[PACKED_KEY_PREFIX + self.quant_type] = cached[1]
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: Mapping, device=None) -> QuantState:
        """Builds a QuantState from a packed or unpacked dict (keys may carry a prefix such as
        ``weight.``); ``qs_dict`` (bitsandbytes' name) is not modified."""
        d = qs_dict
        items = {k.split(".")[-1]: v for k, v in d.items() if "quant_state." not in k}
        packed_keys = [k for k in d if PACKED_KEY_PREFIX in k]
        if len(packed_keys) > 1:
            raise ValueError(f"QuantState.from_dict: more than one packed header: {packed_keys}")
        if packed_keys:
            blob = d[packed_keys[0]]
            if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
                raise TypeError(f"QuantState.from_dict: {packed_keys[0]} must be a uint8 tensor")
            try:
                header = json.loads(bytes(blob.cpu().reshape(-1).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(
                    f"QuantState.from_dict: {packed_keys[0]} is not valid JSON: {e}"
                ) from e
            qt_suffix = packed_keys[0].rsplit(PACKED_KEY_PREFIX, 1)[-1]
            header.setdefault("quant_type", qt_suffix)
            if header["quant_type"] != qt_suffix:  # as bitsandbytes, which checks the key
                raise ValueError(
                    f"QuantState.from_dict: {packed_keys[0]} holds a {header['quant_type']!r} "
                    f"header; the key must end in {header['quant_type']!r}"
                )
        elif "quant_type" in items:
            # (bitsandbytes' unpacked dicts may hold the offset as a 0-dim tensor.)
            header = {
                k: v.item() if isinstance(v, torch.Tensor) else v
                for k, v in items.items()
                if not isinstance(v, torch.Tensor) or k == "nested_offset"
            }
        else:
            raise ValueError(
                "QuantState.from_dict: expected a packed 'quant_state.bitsandbytes__nf4|fp4' "
                "tensor or unpacked keys (quant_type, blocksize, ...), found neither"
            )
        tensors = {
            k.split(".")[-1]: v
            for k, v in d.items()
            if isinstance(v, torch.Tensor) and k.split(".")[-1] != "nested_offset"
        }
        # Double quantization shows in the header's offset or in the nested tensors: either
        # one without the other is a truncated dict (it used to build a non-nested state
        # holding uint8 absmax codes).
        nested = "nested_offset" in header or "nested_absmax" in tensors
        required = ["absmax", "quant_map"] + (
            ["nested_absmax", "nested_quant_map"] if nested else []
        )
        missing = [k for k in required if k not in tensors]
        if nested and "nested_offset" not in header:
            missing.append("nested_offset")
        missing += [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in header]
        if missing:
            raise ValueError(
                f"QuantState.from_dict: missing keys {missing} (truncated state dict?)"
            )

        def get(key):
            return tensors[key].to(device) if device is not None else tensors[key]

        return cls(
            quant_type=header["quant_type"],
            blocksize=header["blocksize"],
            shape=header["shape"],
            dtype=_dtype_from_name(header["dtype"], "dtype"),
            absmax=get("absmax"),
            code=get("quant_map"),
            nested_absmax=get("nested_absmax") if nested else None,
            nested_code=get("nested_quant_map") if nested else None,
            nested_blocksize=header.get("nested_blocksize", NESTED_BLOCKSIZE),
            offset=_offset_from_header(header["nested_offset"]) if nested else None,
        )

    def __repr__(self) -> str:
        return (
            f"QuantState(quant_type={self.quant_type!r}, blocksize={self.blocksize}, "
            f"shape={list(self.shape)}, dtype={self.dtype}, nested={self.nested})"
        )

"""Small host-built tables (tensor indices, sizes, addresses) that device code reads, cached
so that a step neither rebuilds nor recopies them.

A table goes to the device through pinned memory without blocking the host:
``torch.tensor(data, device="cuda")`` copies from pageable memory, which makes the host wait
for every kernel already queued on the stream (an optimizer step would wait for the whole
backward pass before it could queue its first kernel).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable

import torch

# Tables per cache. A step needs up to two per param group and parameter dtype (the 8-bit and
# the float32-state op); models with layer-wise learning rates have a hundred groups and more.
# The tables are small (a few int64 per tensor, an int32 per 2048 elements).
TABLE_CACHE_SIZE = 1024


class TableCache:
    """Tables by key, built on first use; the least recently used goes when the cache is full.
    Safe for threads stepping optimizers at once (a lock around the bookkeeping; a table may
    be built twice by racing threads, one of the equal copies is kept)."""

    def __init__(self, size: int = TABLE_CACHE_SIZE) -> None:
        self._size = size
        self._tables: dict[Hashable, torch.Tensor] = {}  # in order of use, oldest first
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            table = self._tables.pop(key, None)
            if table is not None:
                self._tables[key] = table  # now the most recently used
                return table
        table = build()  # outside the lock: it may copy to a device
        with self._lock:
            built = self._tables.pop(key, None)  # by another thread meanwhile: keep that one
            if built is not None:
                table = built
            while len(self._tables) >= self._size:
                del self._tables[next(iter(self._tables))]
            self._tables[key] = table
        return table

    def __len__(self) -> int:
        return len(self._tables)


def device_key(device: torch.device) -> Hashable:
    """What a table's cache key must hold of where it is used: the device, and on CUDA the
    current stream, so that a table is only read on the stream that copied it (and freed
    in that stream's order when a full cache is cleared)."""
    if device.type == "cuda":
        return device, torch.cuda.current_stream(device).stream_id
    return device


def caching_allowed() -> bool:
    """Tables may be cached: plain eager execution. Under torch.compile the table is a
    constant of the graph; under a dispatch mode (FakeTensorMode, make_fx) it would be a
    fake or traced tensor, wrong for a later real call."""
    return (
        not torch.compiler.is_compiling()
        and torch.utils._python_dispatch._get_current_dispatch_mode() is None
    )


def _build_codebook(kind: str, choice, device: torch.device) -> torch.Tensor:
    """codebooks.dynamic_map(choice, device) (kind "dynamic_map", choice: signed) or
    codebooks.code_4bit(choice, device) (kind "code_4bit", choice: the quant type)."""
    from lowprec_kernels.reference import codebooks

    return getattr(codebooks, kind)(choice, device)


_cached_codebook = functools.lru_cache(maxsize=32)(_build_codebook)


def _shared_codebook(kind: str, choice, device) -> torch.Tensor:
    """One read-only tensor per (kind, choice, device), cached in plain eager execution only,
    built afresh while tracing (caching_allowed)."""
    if not caching_allowed():
        return _build_codebook(kind, choice, device)
    return _cached_codebook(kind, choice, torch.device(device))


def shared_dynamic_map(signed: bool, device: torch.device) -> torch.Tensor:
    """The 8-bit dynamic map on ``device``, one tensor per (signed, device) shared by every
    read-only user (the functional API's default map, the optimizers' states, which one map
    per device lets a param group step in one fused call): cached in plain eager execution
    only, built afresh while tracing (caching_allowed)."""
    return _shared_codebook("dynamic_map", bool(signed), device)


def shared_code_4bit(quant_type: str, device: torch.device) -> torch.Tensor:
    """``quant_type``'s 4-bit codebook on ``device``, shared read-only as above (the
    functional API's QuantState code, the native kernels' quantize_4bit argument)."""
    return _shared_codebook("code_4bit", quant_type, device)


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on ``device``, without making the host wait for the device where
    that is possible (CUDA, outside graph capture)."""
    if device.type != "cuda":
        return table.to(device)
    if torch.cuda.is_current_stream_capturing():
        # A captured copy from a temporary pinned buffer would replay whatever the buffer
        # holds later; a blocking copy fails the capture loudly instead.
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)

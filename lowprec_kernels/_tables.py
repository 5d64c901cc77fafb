"""Small host-built tables (tensor indices, sizes, addresses) that device code reads, cached
so that a step neither rebuilds nor recopies them.

A table goes to the device through pinned memory without blocking the host:
``torch.tensor(data, device="cuda")`` copies from pageable memory, which makes the host wait
for every kernel already queued on the stream (an optimizer step would wait for the whole
backward pass before it could queue its first kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

# Tables per cache; a full cache is cleared (an optimizer needs one or two per param group).
TABLE_CACHE_SIZE = 64


class TableCache:
    """Tables by key, built on first use."""

    def __init__(self, size: int = TABLE_CACHE_SIZE) -> None:
        self._size = size
        self._tables: dict[Hashable, torch.Tensor] = {}

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= self._size:
                self._tables.clear()
            table = self._tables[key] = build()
        return table

    def __len__(self) -> int:
        return len(self._tables)


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on ``device``, without making the host wait for the device."""
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)

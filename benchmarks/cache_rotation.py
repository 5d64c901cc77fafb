"""How large a rotation must be for the benchmarks' inputs to come from memory: the read
rate of ``amax()`` over a cycle of distinct int8 tensors, for cycle sizes in multiples of the
last-level cache. A rate above the large cycles' means part of each tensor was still cached
when its turn came again. The harness rotates over ``ROTATION_LLC_MULTIPLE`` caches; numbers in
benchmarks/results/cpu-bench.md.

    python benchmarks/cache_rotation.py [--tensor-mib 4 16] [--multiples 2 4 8 16 32] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowprec_kernels.bench.harness import (
    ROTATION_LLC_MULTIPLE,
    last_level_cache_bytes,
    positive,
    script_description,
)


def _cycle(tensor_bytes: int, cycle_bytes: int) -> list[torch.Tensor]:
    copies = max(2, -(-cycle_bytes // tensor_bytes))
    return [torch.randint(-128, 128, (tensor_bytes,), dtype=torch.int8) for _ in range(copies)]


def _read_rate(cycle: list[torch.Tensor]) -> float:
    """GB/s of amax() over the copies in turn, twice round the cycle (at least 40 calls)."""
    calls = max(40, 2 * len(cycle))
    start = time.perf_counter()
    for i in range(calls):
        cycle[i % len(cycle)].amax()
    return cycle[0].numel() * calls / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--tensor-mib", type=positive(int), nargs="+", default=[4, 16],
                        help="sizes of the rotated tensors, MiB (default 4 16)")  # fmt: skip
    parser.add_argument("--multiples", type=positive(float), nargs="+", default=[2, 4, 8, 16, 32],
                        help="cycle sizes, in last-level caches (default 2 4 8 16 32)")  # fmt: skip
    parser.add_argument("--rounds", type=positive(int), default=7,
                        help="measurements per case, the median printed (default 7)")  # fmt: skip
    args = parser.parse_args()
    llc = last_level_cache_bytes("cpu")
    print(f"LLC {llc >> 20} MiB, {torch.get_num_threads()} threads, medians of {args.rounds} "
          f"interleaved rounds; the harness rotates over {ROTATION_LLC_MULTIPLE} LLCs")  # fmt: skip
    for mib in args.tensor_mib:
        cycles = {m: _cycle(mib << 20, int(m * llc)) for m in args.multiples}
        for cycle in cycles.values():  # once round each before timing
            _read_rate(cycle)
        rates: dict[float, list[float]] = {m: [] for m in args.multiples}
        for _ in range(args.rounds):  # the cycle sizes interleaved, against the VM's drift
            for m, cycle in cycles.items():
                rates[m].append(_read_rate(cycle))
        for m, cycle in cycles.items():
            print(f"{mib:4d} MiB tensors, cycle of {m:4g} LLC ({len(cycle):4d} copies): "
                  f"amax reads {statistics.median(rates[m]):6.1f} GB/s")  # fmt: skip
        del cycles


if __name__ == "__main__":
    main()

"""Our AdamW8bit step against torch's fused AdamW on one fp32 tensor, rotated over distinct
copies as the bench suite rotates its inputs, for comparing two builds: run it alternately
with PYTHONPATH set to each build's tree, several times, and pair the lines.

The default 3 copies of 16.7M parameters pass 1.1 GB through the cache between two visits to
a copy (4 times this machine's 260 MiB L3; the bench rotates over 8 caches, 13 copies here):
assumed, not checked, to leave nothing of a copy cached. adam_memory_modes.py times the same
two steps on one copy, whose data partly stays in the cache. Numbers in
benchmarks/results/cpu-adam.md.

    PYTHONPATH=/path/to/tree python benchmarks/adam_rotated_ab.py [--copies K] [--seconds S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adam_build_ab import tree_under_test  # noqa: E402
from adam_many_tensors import _optimizer  # noqa: E402

import lowprec_kernels as lpk  # noqa: E402
from lowprec_kernels.bench.harness import positive, script_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--params", type=positive(int), default=16_777_216,
                        help="elements of the tensor; below the optimizers' min_8bit_size "
                             "(4096) ours keeps float32 states (default 16777216)")  # fmt: skip
    parser.add_argument("--copies", type=positive(int), default=3,
                        help="distinct (parameter, gradient, optimizers) sets stepped in turn; "
                             "3 of 16.7M parameters hold 1.3 GB (default 3)")  # fmt: skip
    parser.add_argument("--seconds", type=positive(float), default=8.0,
                        help="how long to keep timing pairs of steps (default 8)")  # fmt: skip
    args = parser.parse_args()
    tree = tree_under_test("adam_rotated_ab")
    shapes = [(args.params,)]
    copies = [
        (_optimizer(lambda ps: lpk.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01), shapes),
         _optimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
                    shapes))
        for _ in range(args.copies)
    ]  # fmt: skip
    ours_s, torch_s, ratios = [], [], []
    end = time.perf_counter() + args.seconds
    while not ratios or time.perf_counter() < end:
        pair = copies[len(ratios) % len(copies)]
        # Which step goes first alternates, so that neither always runs in the other's wake.
        first, second = pair if len(ratios) % 2 == 0 else pair[::-1]
        t0 = time.perf_counter()
        first.step()
        t1 = time.perf_counter()
        second.step()
        t2 = time.perf_counter()
        ours_t, torch_t = (t1 - t0, t2 - t1) if first is pair[0] else (t2 - t1, t1 - t0)
        ours_s.append(ours_t)
        torch_s.append(torch_t)
        ratios.append(torch_t / ours_t)
    print(f"{tree}: {args.copies} copies, {len(ratios)} pairs: ours "
          f"{statistics.median(ours_s) * 1e3:.2f} ms, torch fused "
          f"{statistics.median(torch_s) * 1e3:.2f} ms, speedup (median of pairs) "
          f"{statistics.median(ratios):.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()

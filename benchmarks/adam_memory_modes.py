"""Our 8-bit AdamW step and torch's fused AdamW step, back to back for a while: how each
follows the VM's memory speed, and where our step's time goes in each of its speeds.

This VM's memory flips between two speeds, sometimes within seconds. Each round times, each
as the best of 3 steps after 2 untimed:

* torch's fused AdamW step (bound by the 28 bytes per fp32 parameter it moves);
* our AdamW8bit step;
* our finiteness check alone: the step of an optimizer whose gradient ends in a NaN, which
  reads the gradient and then skips the tensor;
* two ceilings: ``a.add_(b)`` (two reads and a write per element, as an in-place update
  moves them) and ``b.amax()`` (a pure read of a gradient's size).

With ``--copies N`` each column steps N distinct copies in turn (one per call), so that with
enough of them every call reads its data from memory, as in the bench suite's rotation; with
one copy (the default) the data stays partly in the last-level cache.

The summary splits the rounds by torch's time (``--split-ms``) and gives each column's
median; our update is the step less the check. Numbers in benchmarks/results/cpu-adam.md.

    python benchmarks/adam_memory_modes.py [--params N] [--seconds S] [--split-ms MS] [--copies N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import lowprec_kernels as lpk
from lowprec_kernels.bench.harness import positive, script_description

COLUMNS = ("torch fused", "ours", "our check", "add_", "amax")


def _optimizer(make, params: int, nan_last: bool = False) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.randn(params))
    p.grad = torch.randn(params) * 1e-2
    if nan_last:
        p.grad[-1] = float("nan")
    opt = make([p])
    opt.step()
    return opt


def _rotating(fns: list):
    """One call of the next of ``fns`` per call."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def _best_of_three(fn) -> float:
    for _ in range(2):  # settle on itself
        fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _summary(name: str, rounds: list[tuple[float, ...]]) -> str:
    med = [statistics.median(r[i] for r in rounds) * 1e3 for i in range(len(COLUMNS))]
    cells = ", ".join(f"{c} {m:.2f} ms" for c, m in zip(COLUMNS, med))
    speedup = statistics.median(r[0] / r[1] for r in rounds)
    return (f"{name}: {len(rounds)} rounds, {cells}; our update {med[1] - med[2]:.2f} ms; "
            f"speedup {speedup:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--params", type=positive(int), default=16_777_216,
                        help="fp32 parameters of each optimizer (default 16777216)")  # fmt: skip
    parser.add_argument("--seconds", type=positive(float), default=40.0,
                        help="how long to keep taking rounds (default 40)")  # fmt: skip
    parser.add_argument("--split-ms", type=positive(float), default=4.8,
                        help="torch's step time that separates the memory's two speeds in "
                             "the summary (default 4.8, the AMD machine's)")  # fmt: skip
    parser.add_argument("--copies", type=positive(int), default=1,
                        help="distinct copies each column steps in turn (default 1)")  # fmt: skip
    args = parser.parse_args()

    def adamw8bit(ps):
        return lpk.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01)

    def torch_fused(ps):
        return torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)

    def copies(make) -> list:
        return [make() for _ in range(args.copies)]

    def add_of_two():
        a, b = torch.randn(args.params), torch.randn(args.params)
        return lambda: a.add_(b)

    columns = (
        copies(lambda: _optimizer(torch_fused, args.params).step),
        copies(lambda: _optimizer(adamw8bit, args.params).step),
        copies(lambda: _optimizer(adamw8bit, args.params, nan_last=True).step),
        copies(add_of_two),
        copies(lambda: torch.randn(args.params).amax),
    )
    timed = tuple(_rotating(fns) for fns in columns)
    rounds = []
    end = time.time() + args.seconds
    while time.time() < end:
        rounds.append(tuple(_best_of_three(fn) for fn in timed))
    print(f"{args.params} fp32 parameters, {args.copies} copies, {torch.get_num_threads()} "
          f"threads, {len(rounds)} rounds (each the best of 3 after 2 untimed)")  # fmt: skip
    split = args.split_ms / 1e3
    for name, part in (
        (f"torch fused < {args.split_ms:g} ms", [r for r in rounds if r[0] < split]),
        (f"torch fused >= {args.split_ms:g} ms", [r for r in rounds if r[0] >= split]),
    ):
        if part:
            print(_summary(name, part))


if __name__ == "__main__":
    main()

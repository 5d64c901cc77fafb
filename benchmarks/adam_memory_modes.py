"""Our 8-bit AdamW step and torch's fused AdamW step, back to back for a while, one line per
round: how each follows the VM's memory speed.

torch's fused step is bound by the bytes it reads (16 per fp32 parameter), so it swings with
the VM's memory speed; ours is bound by its instructions and barely moves. The summary splits
the rounds by torch's time (``--split-ms``). Numbers in benchmarks/results/cpu-adam.md.

    python benchmarks/adam_memory_modes.py [--params N] [--seconds S] [--split-ms MS]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowprec_kernels as lpk


def _optimizer(make, params: int) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.randn(params))
    p.grad = torch.randn(params) * 1e-2
    opt = make([p])
    opt.step()
    return opt


def _best_of_three(opt: torch.optim.Optimizer) -> float:
    for _ in range(2):  # settle on itself
        opt.step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=16_777_216)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--split-ms", type=float, default=4.8)
    args = parser.parse_args()
    torch_fused = _optimizer(
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True), args.params
    )
    ours = _optimizer(lambda ps: lpk.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01), args.params)
    rounds = []
    end = time.time() + args.seconds
    while time.time() < end:
        rounds.append((_best_of_three(torch_fused), _best_of_three(ours)))
    print(f"{args.params} fp32 parameters, {torch.get_num_threads()} threads, {len(rounds)} "
          "rounds (each step's best of 3 after 2 untimed)")  # fmt: skip
    split = args.split_ms / 1e3
    for name, part in (
        (f"torch fused < {args.split_ms:g} ms", [r for r in rounds if r[0] < split]),
        (f"torch fused >= {args.split_ms:g} ms", [r for r in rounds if r[0] >= split]),
    ):
        if part:
            print(f"{name}: {len(part)} rounds, torch fused "
                  f"{statistics.median(a for a, _ in part) * 1e3:.2f} ms, ours "
                  f"{statistics.median(b for _, b in part) * 1e3:.2f} ms, speedup "
                  f"{statistics.median(a / b for a, b in part):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

"""Optimizer steps over many parameter tensors: the per-tensor cost of AdamW8bit against
torch's fused AdamW, on uniform sets and on GPT-2 small's 148 parameter shapes.

Tensors below ``min_8bit_size`` (4096 elements) keep float32 states and take the optimizer's
batched float32 path; the others go through one fused 8-bit call per step. Numbers in
benchmarks/results/cpu-adam.md.

    python benchmarks/adam_many_tensors.py [--rounds R] [--max-params N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowprec_kernels as lpk
from lowprec_kernels.bench.harness import positive, script_description


def _gpt2_small_shapes(layers=12, d=768, vocab=50257, context=1024) -> list[tuple[int, ...]]:
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                   (4 * d,), (4 * d, d), (d,)]  # fmt: skip
    return shapes + [(d,), (d,)]


def _optimizer(make, shapes) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make(params)
    opt.step()
    return opt


def _compare(shapes, rounds: int) -> tuple[float, float]:
    makers = (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        lambda ps: lpk.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01),
    )
    opts = [_optimizer(make, shapes) for make in makers]
    times: list[list[float]] = [[], []]
    for _ in range(rounds):  # interleaved
        for opt, out in zip(opts, times):
            opt.step()
            t0 = time.perf_counter()
            opt.step()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--rounds", type=positive(int), default=10,
                        help="interleaved timed steps of each optimizer per case (default 10)")  # fmt: skip
    parser.add_argument("--max-params", type=positive(int), default=None,
                        help="skip the cases with more parameters in all")  # fmt: skip
    args = parser.parse_args()
    gpt2 = _gpt2_small_shapes()
    cases = [
        ("1 x 1048576", [(1 << 20,)]),
        ("256 x 4096", [(4096,)] * 256),
        ("1024 x 1024 (float32 states)", [(1024,)] * 1024),
        ("200 x 65536", [(65536,)] * 200),
        ("GPT-2 small, its 98 tensors below 4096", [s for s in gpt2 if torch.Size(s).numel() < 4096]),
        ("GPT-2 small, all 148 tensors (124M)", gpt2),
    ]  # fmt: skip
    print(f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds")
    for name, shapes in cases:
        if (
            args.max_params is not None
            and sum(torch.Size(s).numel() for s in shapes) > args.max_params
        ):
            continue
        fused, ours = _compare(shapes, args.rounds)
        print(f"{name:42s} torch fused {fused * 1e3:8.3f} ms  ours {ours * 1e3:8.3f} ms  "
              f"speedup {fused / ours:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

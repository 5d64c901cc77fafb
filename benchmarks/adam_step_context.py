"""One optimizer step in two contexts: right after steps of itself, and right after a
compute-bound stretch standing in for the backward pass (GEMMs on data that stays in cache).

Torch's fused AdamW is memory-bound and ours compute-bound, so what precedes a step could
favour one of them; this times both, interleaved, in each context. Numbers in
benchmarks/results/cpu-adam.md (sixth session).

    python benchmarks/adam_step_context.py [--params N] [--rounds R] [--gemm-ms MS]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowprec_kernels as lpk
from lowprec_kernels.bench.harness import positive, script_description


def _optimizers(make, params: int) -> list[torch.optim.Optimizer]:
    """Two optimizers over distinct fp32 parameters, each stepped once (state allocated)."""
    out = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.randn(params) * 0.01)
        p.grad = torch.randn(params) * 1e-3
        opt = make([p])
        opt.step()
        out.append(opt)
    return out


def _compute_for(seconds: float, a: torch.Tensor, b: torch.Tensor) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(a, b)


def _timed_step(opt: torch.optim.Optimizer) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--params", type=positive(int), default=16_777_216,
                        help="fp32 parameters of each optimizer (default 16777216)")  # fmt: skip
    parser.add_argument("--rounds", type=positive(int), default=12,
                        help="timed steps of each optimizer in each context (default 12)")  # fmt: skip
    parser.add_argument("--gemm-ms", type=positive(float), default=20.0,
                        help="length of the GEMM stretch before a step (default 20)")  # fmt: skip
    args = parser.parse_args()
    makers = {
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        "ours": lambda ps: lpk.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01),
    }
    opts = {name: _optimizers(make, args.params) for name, make in makers.items()}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    times = {(name, ctx): [] for name in makers for ctx in ("after itself", "after GEMMs")}
    for r in range(args.rounds):
        for name, pair in opts.items():
            for i in range(3):  # settle on itself
                pair[i % 2].step()
            times[name, "after itself"].append(_timed_step(pair[r % 2]))
            _compute_for(args.gemm_ms / 1e3, a, b)
            times[name, "after GEMMs"].append(_timed_step(pair[(r + 1) % 2]))
    print(f"{args.params} fp32 parameters, {torch.get_num_threads()} threads, medians of "
          f"{args.rounds} rounds, {args.gemm_ms:g} ms of GEMMs")  # fmt: skip
    for (name, ctx), ts in times.items():
        print(f"{name:12s} {ctx:13s} {statistics.median(ts) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

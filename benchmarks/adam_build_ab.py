"""AdamW8bit step times of the lowprec_kernels build on the path, for comparing two builds: run
it alternately with PYTHONPATH set to each build's tree, several times, and pair the lines.
Cases: GPT-2 small's 50 tensors of 4096 elements and more (124M parameters), the same without
the embedding, and one 16.7M tensor. Numbers in benchmarks/results/cpu-adam.md.

    PYTHONPATH=/path/to/tree python benchmarks/adam_build_ab.py [--rounds R] [--scale S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adam_many_tensors import _gpt2_small_shapes, _optimizer  # noqa: E402

import lowprec_kernels as lpk  # noqa: E402
from lowprec_kernels.bench.harness import positive, script_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--rounds", type=positive(int), default=10)
    parser.add_argument("--scale", type=positive(float), default=1.0,
                        help="shrink every case by this factor (for a quick try)")  # fmt: skip
    args = parser.parse_args()

    def shrink(shape):
        return (max(4096, int(torch.Size(shape).numel() * args.scale)),)

    big = [s for s in _gpt2_small_shapes() if torch.Size(s).numel() >= 4096]
    cases = {
        "gpt2-50": [shrink(s) for s in big],
        "gpt2-49-no-embedding": [shrink(s) for s in big[1:]],
        "one-16.7M": [shrink((1 << 24,))],
    }
    opts = {
        name: _optimizer(lambda ps: lpk.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.01), shapes)
        for name, shapes in cases.items()
    }
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(args.rounds):  # interleaved
        for name, opt in opts.items():
            opt.step()
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    where = Path(lpk.__file__).resolve().parent.parent
    print(f"{where}: " + "  ".join(
        f"{name} {statistics.median(t) * 1e3:.2f} ms" for name, t in times.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()

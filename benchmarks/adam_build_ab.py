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


def tree_under_test(script: str) -> Path:
    """The source tree whose lowprec_kernels and _C were imported: a tree without a built _C of
    its own would silently time another one (an editable install's), so that is refused."""
    tree = Path(lpk.__file__).resolve().parent.parent
    native = Path(lpk._C.__file__).resolve() if lpk.available_backends()["cpu"] else None
    if native is None or tree not in native.parents:
        raise SystemExit(
            f"{script}: lowprec_kernels comes from {tree} but its _C from {native}: "
            "build the tree under test in place (setup.py build_ext --inplace) first"
        )
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--rounds", type=positive(int), default=10,
                        help="timed steps per case, interleaved (default 10)")  # fmt: skip
    parser.add_argument("--scale", type=positive(float), default=1.0,
                        help="multiply every case's size by this factor, e.g. 0.1 for a quick "
                             "try (default 1; at least 4096 elements a tensor)")  # fmt: skip
    args = parser.parse_args()
    tree = tree_under_test("adam_build_ab")

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
    print(f"{tree}: " + "  ".join(
        f"{name} {statistics.median(t) * 1e3:.2f} ms" for name, t in times.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()

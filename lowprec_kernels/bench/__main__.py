"""The benchmark CLI (ARCHITECTURE.md §3, §6).

    python -m lowprec_kernels.bench [int8|nf4|adam|blockwise|all] [--device cpu|cuda]
        [--quick | --smoke] [--json PATH] [--plot PATH] [--backend NAME]...

Prints a header with the machine and its measured ceilings, then one table per suite.
Exit status: 0 when every requested suite ran (or is not implemented yet), 1 if one failed
or no candidate backend could run (a build without its native extension), 2 for unusable
arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any

import torch

from lowprec_kernels.bench import SUITES, load_suite
from lowprec_kernels.bench.harness import (
    EFFORTS,
    NATIVE_BACKENDS,
    Bench,
    Settings,
    header,
    machine_info,
    measure_ceilings,
    pin_threads,
    plot,
    plot_format,
    report,
    table,
    write_json,
)

# Every backend a candidate may name (reference is the baseline, always timed).
NATIVE_BACKEND_NAMES = tuple(dict.fromkeys(b for names in NATIVE_BACKENDS.values() for b in names))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lowprec_kernels.bench",
        description="Microbenchmarks of lowprec_kernels against baselines measured in the "
        "same run, with the machine's roofline.",
    )
    p.add_argument("suite", nargs="?", default="all", choices=(*SUITES, "all"),
                   help="the suite to run (default: all)")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the kernels and baselines run (default: cpu)")  # fmt: skip
    effort = p.add_mutually_exclusive_group()
    effort.add_argument(
        "--quick",
        action="store_true",
        help="fewer sizes and repeats (all suites: about 5 minutes on a 2-core CPU)",
    )
    effort.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat: checks that the suites run; "
                        "numbers meaningless")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="write every number and the machine info")
    p.add_argument("--plot", metavar="PATH", help="speedup bar chart (PNG, needs matplotlib)")
    p.add_argument("--backend", action="append", metavar="NAME", choices=NATIVE_BACKEND_NAMES,
                   help="a candidate backend to time against reference; repeat for several "
                   "(default: the device's native ones: cpu | cuda and triton)")  # fmt: skip
    args = p.parse_args(argv)
    if args.backend:
        args.backend = list(dict.fromkeys(args.backend))  # each once
    return args


def argument_problem(args: argparse.Namespace) -> str | None:
    """What makes the arguments unusable, found before anything is measured."""
    import lowprec_kernels as lpk

    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: torch sees no CUDA device"
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        if not path:
            return f"{option}: an empty path"
        if os.path.isdir(path):
            return f"{option} {path}: a directory, not a file path"
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"{option} {path}: its directory does not exist"
        problem = _unwritable(path)
        if problem is not None:
            return f"{option} {path}: cannot be written ({problem})"
    if args.plot is not None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:
            return f"--plot {args.plot}: needs matplotlib, which is not importable here"
        formats = FigureCanvasAgg.get_supported_filetypes()
        if plot_format(args.plot) not in formats:
            return (f"--plot {args.plot}: matplotlib writes no {plot_format(args.plot)!r} "
                    f"images (one of {', '.join(sorted(formats))})")  # fmt: skip
    if args.backend:
        native = NATIVE_BACKENDS.get(args.device, ())
        foreign = [b for b in args.backend if b not in native]
        if foreign:
            return f"--backend {foreign[0]}: not a backend of --device {args.device} ({native})"
        missing = [b for b in args.backend if not lpk.available_backends().get(b)]
        if missing:
            return f"--backend {missing[0]}: not available in this build ({lpk.build_info()})"
    return None


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written, found by creating it (and removing it again if it was
    not there), or None."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    if not existed:
        os.remove(path)
    return None


def run_suite(name: str, settings: Settings, ceilings) -> dict[str, Any]:
    """{status, rows, notes} of one suite; prints its table as soon as it is done."""
    module = load_suite(name)
    print(f"\n== {name}")
    if module is None:
        print("not implemented yet")
        return {"status": "not implemented yet", "rows": [], "notes": []}
    bench = Bench(settings)
    candidates, skipped = bench.candidate_backends()
    if not candidates:  # only reference would run: a table without a single candidate
        status = f"error: no candidate backend can run here ({'; '.join(skipped)})"
        print(status)
        return {"status": status, "rows": [], "notes": skipped}
    try:
        rows = module.rows(bench)
    except Exception as e:  # noqa: BLE001 - one broken suite must not hide the others
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}")
        return {"status": f"error: {type(e).__name__}: {e}", "rows": [], "notes": bench.notes}
    print(table(rows, ceilings))
    for message in bench.notes:
        print(f"note: {message}")
    return {"status": "ok", "rows": rows, "notes": bench.notes}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    problem = argument_problem(args)  # found now, not after the whole run has been measured
    if problem is not None:
        print(f"python -m lowprec_kernels.bench: {problem}", file=sys.stderr)
        return 2
    effort = EFFORTS["smoke" if args.smoke else "quick" if args.quick else "full"]
    settings = Settings(args.device, effort, tuple(args.backend) if args.backend else None)

    started = time.perf_counter()
    pin_threads()
    ceilings = measure_ceilings(settings)
    machine = machine_info(args.device)
    print(header(machine, ceilings, settings), flush=True)

    names = SUITES if args.suite == "all" else (args.suite,)
    results = {name: run_suite(name, settings, ceilings) for name in names}

    if args.json:
        duration = time.perf_counter() - started
        write_json(report(machine, ceilings, settings, results, argv, duration), args.json)
        print(f"\n--json: wrote {args.json}")
    if args.plot:
        print(plot([row for r in results.values() for row in r["rows"]], args.plot))
    return 1 if any(r["status"].startswith("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

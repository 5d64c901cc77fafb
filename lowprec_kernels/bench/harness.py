"""Timing, machine ceilings and reporting for the microbenchmarks (ARCHITECTURE.md §6).

The machines this runs on are shared and noisy, so every number is a ratio against a
baseline measured in the same run:

* inputs are rotated: enough distinct copies that together they exceed the last-level
  cache, cycled so that no call reads data a previous call left in the cache;
* candidate and baseline are interleaved (A B A B ...) and the reported ratio is the median
  of the per-pair ratios, with its interquartile range as the spread; each timed sample
  follows untimed calls of the same function (``Effort.settle_s``), so that no function is
  timed in the wake of another;
* torch uses as many threads as cores this process may run on;
* the machine's own ceilings (copy bandwidth, GEMM rates) are measured once per process, and
  every row reports the fraction of its roofline bound it reaches.

A suite (``blockwise.py``, ...) is a module with ``rows(bench: Bench) -> list[Row]``; it uses
:meth:`Bench.rotation`, :meth:`Bench.compare` and :meth:`Bench.alone` and returns rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_LLC_BYTES = 64 << 20  # when the cache size cannot be read


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Effort:
    """How hard to measure: the CLI's default (``full``), ``--quick`` and ``--smoke``."""

    name: str
    pairs: int  # timed A/B pairs per row, at most
    min_pairs: int  # timed pairs per row, at least (even past the row's time budget)
    warmup: int  # untimed calls of each function before timing
    row_budget_s: float  # stop adding pairs to a row once it has run this long
    min_sample_s: float  # one sample repeats the call until it lasts this long (tiny ops)
    settle_s: float  # untimed calls of a function before each of its samples, at least this long
    rotate: bool  # rotate inputs past the LLC (off for smoke: tiny sizes, tiny memory)


EFFORTS = {
    "full": Effort("full", pairs=21, min_pairs=5, warmup=2, row_budget_s=15.0,
                   min_sample_s=2e-3, settle_s=6e-3, rotate=True),
    "quick": Effort("quick", pairs=7, min_pairs=3, warmup=1, row_budget_s=3.0,
                    min_sample_s=1e-3, settle_s=3e-3, rotate=True),
    "smoke": Effort("smoke", pairs=1, min_pairs=1, warmup=1, row_budget_s=0.0,
                    min_sample_s=0.0, settle_s=0.0, rotate=False),
}  # fmt: skip

# Native backends worth benchmarking per device type, in the order they are tried.
NATIVE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    effort: Effort = EFFORTS["full"]
    backends: tuple[str, ...] | None = None  # --backend: candidates to run (None: native ones)


# --------------------------------------------------------------------------- the machine


def pin_threads() -> int:
    """As many torch threads as cores this process may run on (os.sched_getaffinity, not
    os.cpu_count(): containers); the threads themselves are not pinned to cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
    return torch.get_num_threads()


def _parse_size(text: str) -> int:
    """'32768K' / '32 MiB' / '1M' -> bytes."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)", text.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse cache size {text!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


SYSFS_CPU = Path("/sys/devices/system/cpu")


def _cpu_top_cache(cpu: int) -> tuple[int, int, str] | None:
    """(level, bytes, the CPUs sharing it) of the highest-level cache of ``cpu``, from sysfs."""
    best = None
    for index in (SYSFS_CPU / f"cpu{cpu}" / "cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        if best is None or (level, size) > best[:2]:
            best = (level, size, shared)
    return best


def last_level_cache_bytes(device: str = "cpu") -> int:
    """Bytes of the caches in front of memory: on the CPU the last-level caches of all the
    CPUs this process may run on, each instance counted once (a host with several L3s, one
    per core complex, caches that much between the threads); CUDA: the L2."""
    if device == "cuda":
        size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        return int(size) or DEFAULT_LLC_BYTES
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}
    instances: dict[str, int] = {}
    for cpu in sorted(cpus):
        top = _cpu_top_cache(cpu)
        if top is not None:
            instances[top[2]] = top[1]
    return sum(instances.values()) or DEFAULT_LLC_BYTES


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_info() -> dict[str, Any]:
    """What the lowprec_kernels package reports about itself; never fails the benchmark."""
    info: dict[str, Any] = {}
    try:
        import lowprec_kernels as lpk

        info["available_backends"] = lpk.available_backends()
        if callable(getattr(lpk, "build_info", None)):
            info["build_info"] = lpk.build_info()
    except Exception as e:  # noqa: BLE001 - a broken package must not stop the benchmark
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def _distribution_versions() -> dict[str, str | None]:
    """The version of this package (the one running, installed or not) and of the baselines'
    and backends' libraries (None: not installed), these read from the metadata without
    importing them."""
    from importlib import metadata

    import lowprec_kernels

    versions: dict[str, str | None] = {"lowprec_kernels": lowprec_kernels.__version__}
    for name in ("bitsandbytes", "triton", "torchao"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _source_commit() -> str | None:
    """The git commit of the source tree this package runs from, if it is a checkout (with
    "+dirty" when tracked files have uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def machine_info(device: str) -> dict[str, Any]:
    info = {
        "host": platform.node(),
        "cpu_model": cpu_model(),
        "cores_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "llc_bytes": last_level_cache_bytes(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "versions": _distribution_versions(),
        "source_commit": _source_commit(),
        **_package_info(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- input rotation


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def nbytes(obj) -> int:
    """Total bytes of the tensors in a tensor / nested tuple, list or dict."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(item) for item in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def inference(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` as inference runs it (under no_grad): baselines that are modules (the
    bitsandbytes layers) are called this way."""
    with torch.no_grad():
        return module(x)


class Cycle:
    """Prebuilt inputs handed out in turn by :meth:`next`: what the timing functions take."""

    def __init__(self, copies: list):
        self.copies = copies
        self._i = 0

    def next(self):
        item = self.copies[self._i]
        self._i = (self._i + 1) % len(self.copies)
        return item

    def __len__(self) -> int:
        return len(self.copies)


class Rotation(Cycle):
    """Distinct copies of one input, handed out in turn by :meth:`next`.

    The copies together hold at least ``target_bytes`` (``Bench`` asks for
    ``ROTATION_LLC_MULTIPLE`` last-level caches), so by the time a copy comes round again
    the cache has been flushed of it: every call reads from memory, as a real workload does
    when it walks over weights or optimizer state. Copies are clones of ``sample``: same
    values, distinct memory.
    """

    def __init__(self, sample, target_bytes: int, read_per_call: int | None = None):
        # read_per_call: the bytes of a copy that one of the compared functions reads, where
        # a copy holds both functions' operands (a quantized and a dense weight): each
        # function's own share of the copies must exceed the target.
        per_copy = max(1, nbytes(sample) if read_per_call is None else read_per_call)
        count = max(2, math.ceil(target_bytes / per_copy))
        super().__init__([sample] + [_clone(sample) for _ in range(count - 1)])


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _sample(fn: Callable, inputs: Cycle, calls: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``calls`` successive rotated inputs."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(inputs.next())
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(inputs.next())
    return (time.perf_counter() - t0) / calls


def _calls_per_sample(fn: Callable, inputs: Cycle, settings: Settings) -> int:
    """Warm up, then pick how many calls make one sample last ``min_sample_s``."""
    for _ in range(settings.effort.warmup):
        fn(inputs.next())
    _sync(settings.device)
    once = _sample(fn, inputs, 1, settings.device)
    if once <= 0 or settings.effort.min_sample_s <= 0:
        return 1
    return max(1, min(1000, math.ceil(settings.effort.min_sample_s / once)))


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all equal for a single value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Timing:
    """Per-call times (seconds) and, when there is a baseline, baseline / candidate ratios."""

    seconds: float  # median per-call time of the candidate
    seconds_iqr: tuple[float, float]
    best_seconds: float  # fastest sample: the machine's noise shows as best << median
    pairs: int  # samples taken (A/B pairs when there is a baseline)
    baseline_seconds: float | None = None  # median per-call time of the baseline
    baseline_best_seconds: float | None = None
    speedup: float | None = None  # median of per-pair baseline/candidate: > 1 = faster
    speedup_iqr: tuple[float, float] | None = None
    floor_seconds: float | None = None  # median per-call time of the floor (copy_ of the bytes)
    floor_fraction: float | None = None  # median of per-round floor/candidate: 1 = copy speed
    floor_fraction_iqr: tuple[float, float] | None = None


# A function and the rotation its argument comes from.
Timed = tuple[Callable, Cycle]


def _measure(timed: Sequence[Timed], settings: Settings) -> list[list[float]]:
    """Per-call samples of each function, interleaved: f0 f1 f2 f0 f1 f2 ...

    Each sample is timed after untimed samples of the same function (on the next rotated
    inputs) lasting settle_s: a function's time right after another's carries that one's
    wake. On this 2-core VM our matmul_4bit at M = 1, 4096 x 4096 (weights from memory),
    took 324, 281, 255 ... us per call after two fp32 and four bf16 F.linear calls and 16
    copy_ calls, and reached its 177-181 us after itself only after ~30 calls (~6 ms). The
    same kernel on weights held in L2 showed no such wake (one slow call): it is the memory
    side, not the clock. At full effort the settle is 6 ms, under --quick 3 ms, whose numbers
    may still carry part of that wake.
    """
    effort = settings.effort
    calls = [_calls_per_sample(fn, inputs, settings) for fn, inputs in timed]
    samples: list[list[float]] = [[] for _ in timed]
    start = time.perf_counter()
    for i in range(effort.pairs):
        if i >= effort.min_pairs and time.perf_counter() - start > effort.row_budget_s:
            break
        for (fn, inputs), n, out in zip(timed, calls, samples):
            settled = time.perf_counter() + effort.settle_s
            _sample(fn, inputs, n, settings.device)  # untimed, at least once
            while time.perf_counter() < settled:
                _sample(fn, inputs, n, settings.device)
            out.append(_sample(fn, inputs, n, settings.device))
    return samples


def _ratios(numerators: Sequence[float], denominators: Sequence[float]):
    """Median and IQR of the per-round ratios numerator / denominator."""
    ratios = [a / b for a, b in zip(numerators, denominators) if b > 0]
    if not ratios:
        return math.nan, (math.nan, math.nan)
    r25, r50, r75 = _quartiles(ratios)
    return r50, (r25, r75)


def _timing(samples: list[list[float]], has_baseline: bool, has_floor: bool) -> Timing:
    """Timing of samples[0] (candidate), then baseline and floor in that order if present."""
    cand = samples[0]
    c25, c50, c75 = _quartiles(cand)
    t = Timing(seconds=c50, seconds_iqr=(c25, c75), best_seconds=min(cand), pairs=len(cand))
    rest = iter(samples[1:])
    if has_baseline:
        base = next(rest)
        t.baseline_seconds = statistics.median(base)
        t.baseline_best_seconds = min(base)
        t.speedup, t.speedup_iqr = _ratios(base, cand)
    if has_floor:
        floor = next(rest)
        t.floor_seconds = statistics.median(floor)
        t.floor_fraction, t.floor_fraction_iqr = _ratios(floor, cand)
    return t


def compare(
    candidate: Callable,
    baseline: Callable,
    inputs: Cycle,
    settings: Settings,
    floor: Timed | None = None,
) -> Timing:
    """Times ``candidate(x)`` against ``baseline(x)`` interleaved, x drawn from ``inputs``.

    ``floor`` (say, a ``copy_`` moving the same bytes) joins the interleaving, and the row
    also reports floor time / candidate time per round: the fraction of the floor's speed
    reached, measured at the same moments, which holds up where the machine's bandwidth
    drifts between the ceiling measurement and the row.
    """
    timed = [(candidate, inputs), (baseline, inputs), *([floor] if floor else [])]
    return _timing(_measure(timed, settings), True, floor is not None)


def alone(fn: Callable, inputs: Cycle, settings: Settings, floor: Timed | None = None) -> Timing:
    """Times ``fn(x)`` with no baseline (reference-only rows, the copy row)."""
    timed = [(fn, inputs), *([floor] if floor else [])]
    return _timing(_measure(timed, settings), False, floor is not None)


# --------------------------------------------------------------------------- ceilings


@dataclass
class Ceilings:
    """The machine's measured limits: the best of several runs (peak, like STREAM)."""

    copy_gbps: float  # read + write bytes of a large tensor copy
    fp32_gflops: float
    bf16_gflops: float
    int8_gops: float | None  # torch._int_mm; None where the device does not support it
    parallel_op_s: float | None = None  # median time of a small multi-threaded CPU op
    notes: list[str] = field(default_factory=list)
    # Bytes read by a reduction over a large tensor. Rows that read far more than they write
    # (a GEMV's weight) take it as their bandwidth limit: a copy's writes also cost a read of
    # each destination line, so copy_gbps understates what reading alone reaches.
    read_gbps: float | None = None
    # Bytes read and written back in place by ``a.add_(b)`` over large tensors (two reads and
    # one write per element): the pattern of an optimizer step. A line written where it was
    # just read needs no read for ownership, so this moves more than a copy (on the 2-core
    # development VM ~126 GB/s against a copy's ~84 in the same minute).
    update_gbps: float | None = None

    def compute(self, kind: str) -> float | None:
        """The GEMM rate (ops/s / 1e9) limiting a row whose ops are of ``kind``."""
        return {"fp32": self.fp32_gflops, "bf16": self.bf16_gflops, "int8": self.int8_gops}[kind]


_CEILINGS: dict[tuple[str, str], Ceilings] = {}


def _best_seconds(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()  # warm-up: first-touch of outputs, library initialisation
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _copy_rate(nbytes: int, repeats: int, device: str) -> float:
    """GB/s of ``dst.copy_(src)``, counting the bytes read and the bytes written."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), repeats, device) / 1e9


def _read_rate(nbytes: int, repeats: int, device: str) -> float:
    """GB/s of ``src.amax()`` over an fp32 tensor of ``nbytes``: the bytes read."""
    src = torch.randn(nbytes // 4, device=device)
    return nbytes / _best_seconds(lambda: src.amax(), repeats, device) / 1e9


def _update_rate(nbytes: int, repeats: int, device: str) -> float:
    """GB/s of ``a.add_(b)`` over fp32 tensors of ``nbytes`` each: a and b read, a written."""
    a = torch.randn(nbytes // 4, device=device)
    b = torch.randn_like(a)
    return 3 * nbytes / _best_seconds(lambda: a.add_(b), repeats, device) / 1e9


def _parallel_op_seconds(repeats: int = 30) -> float:
    """Median time of a small op that uses every thread (a 1M-element add, ~50 us alone).

    On a shared VM a thread whose core another process holds wakes up late, and then every
    multi-threaded op takes milliseconds: this makes that state visible in the header.
    """
    x = torch.randn(1 << 20)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.add(1.0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gemm_rate(dtype: torch.dtype, n: int, repeats: int, device: str) -> float:
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        mm = torch._int_mm
    else:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        mm = torch.matmul
    return 2 * n**3 / _best_seconds(lambda: mm(a, b), repeats, device) / 1e9


def measure_ceilings(settings: Settings) -> Ceilings:
    """Copy bandwidth and GEMM rates of this device; measured once per process and effort."""
    key = (settings.device, settings.effort.name)
    if key in _CEILINGS:
        return _CEILINGS[key]
    device, smoke = settings.device, settings.effort.name == "smoke"
    repeats = {"full": 20, "quick": 10, "smoke": 2}[settings.effort.name]
    notes = []

    # Copy: a source of 8x the LLC, so neither buffer stays cached between repeats and one
    # scheduling hiccup (ms on a shared VM) is small against the copy's own time.
    copy_bytes = 4 << 20 if smoke else max(8 * last_level_cache_bytes(device), 256 << 20)
    copy_gbps = _copy_rate(copy_bytes, repeats, device)
    notes.append(f"copy: {copy_bytes >> 20} MiB tensor copy_, read + write bytes counted")
    read_gbps = _read_rate(copy_bytes, repeats, device)
    notes.append(f"read: {copy_bytes >> 20} MiB fp32 tensor amax(), bytes read counted")
    update_gbps = _update_rate(copy_bytes, repeats, device)
    notes.append(f"update: a.add_(b) on {copy_bytes >> 20} MiB fp32 tensors, a and b read and a "
                 "written counted")  # fmt: skip

    n = 128 if smoke else 2048
    if device == "cuda":
        notes.append("fp32 GEMM without TF32 (torch default)")
    fp32 = _gemm_rate(torch.float32, n, repeats, device)
    bf16 = _gemm_rate(torch.bfloat16, n, repeats, device)
    try:
        int8 = _gemm_rate(torch.int8, n, repeats, device)
    except (RuntimeError, NotImplementedError) as e:
        int8 = None
        notes.append(f"int8 GEMM: torch._int_mm not supported on {device}: {e}".splitlines()[0])
    notes.append(f"GEMMs: torch.mm / torch._int_mm on square n={n}, 2n^3 ops: torch's rate, "
                 "not the cores' peak, so a kernel can pass 100% of it")  # fmt: skip
    parallel = _parallel_op_seconds() if device == "cpu" else None
    if parallel is not None and parallel > 1e-3:
        notes.append(
            f"WARNING: a 1M-element add takes {parallel * 1e3:.1f} ms (normally ~0.05 ms): "
            "another process holds a core, multi-threaded timings are unreliable now"
        )
    _CEILINGS[key] = Ceilings(copy_gbps, fp32, bf16, int8, parallel, notes, read_gbps, update_gbps)
    return _CEILINGS[key]


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One measured line of a suite's table.

    ``bytes_moved`` counts each byte a kernel must read or write once (its memory traffic
    lower bound); ``ops`` its arithmetic operations (a multiply-add is two), and ``compute``
    names the GEMM ceiling those ops run against (``fp32``/``bf16``/``int8``; None for a
    memory-bound kernel whose ops are not the limit).
    """

    suite: str
    what: str
    shape: tuple[int, ...]
    dtype: str
    backend: str
    timing: Timing
    baseline: str | None = None
    bytes_moved: int | None = None
    ops: int | None = None
    compute: str | None = None
    note: str = ""
    reads_only: bool = False  # bytes_moved is (almost) all reads: the read rate bounds it
    in_place: bool = False  # bytes_moved is read and written back in place: the update rate

    def roofline(self, ceilings: Ceilings) -> dict[str, Any]:
        """Achieved rates and the fraction of the roofline bound max(bytes/BW, ops/peak)."""
        t = self.timing.seconds
        gbps = self.bytes_moved / t / 1e9 if self.bytes_moved else None
        gops = self.ops / t / 1e9 if self.ops else None
        bounds = {}
        if self.bytes_moved and self.reads_only and ceilings.read_gbps:
            bounds["read"] = self.bytes_moved / (ceilings.read_gbps * 1e9)
        elif self.bytes_moved and self.in_place and ceilings.update_gbps:
            bounds["update"] = self.bytes_moved / (ceilings.update_gbps * 1e9)
        elif self.bytes_moved:
            bounds["copy"] = self.bytes_moved / (ceilings.copy_gbps * 1e9)
        peak = ceilings.compute(self.compute) if self.compute else None
        if self.ops and peak:
            bounds[f"{self.compute}_gemm"] = self.ops / (peak * 1e9)
        limit = max(bounds, key=bounds.get) if bounds else None
        return {
            "gbps": gbps,
            "gops": gops,
            "limit": limit,
            "roofline_fraction": bounds[limit] / t if limit else None,
        }

    def as_dict(self, ceilings: Ceilings) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d.update(self.roofline(ceilings))
        return d


# --------------------------------------------------------------------------- script arguments


def positive(kind: type):
    """An argparse ``type`` taking numbers of ``kind`` above 0 (the benchmark scripts' sizes,
    rounds and durations), refusing others with the script's usage."""

    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def script_description(doc: str) -> str:
    """A benchmark script's ``--help`` description: its docstring's first paragraph."""
    return " ".join(doc.split("\n\n")[0].split())


# --------------------------------------------------------------------------- the context


# How much a rotation holds, in last-level caches. Twice the cache was not enough here: a
# 64 MiB cycle of 16 MiB int8 tensors still had part of each in the 32 MiB L3 when it came
# round (amax() read 58-67 GB/s, against 42-50 GB/s with cycles of 192 MiB and more; the same
# with 4 MiB tensors), as an L3 that is not strictly LRU would (the cause was not isolated).
# Eight caches read at memory speed with margin (benchmarks/cache_rotation.py, results in
# benchmarks/results/cpu-bench.md).
ROTATION_LLC_MULTIPLE = 8


class Bench:
    """What a suite gets: the settings, the ceilings and the measuring helpers."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.device
        self.effort = settings.effort
        self.llc_bytes = last_level_cache_bytes(settings.device)
        # The bytes a rotation's copies hold together (no rotation at smoke effort).
        self.rotation_bytes = ROTATION_LLC_MULTIPLE * self.llc_bytes if self.effort.rotate else 0
        self.notes: list[str] = []  # suite-level remarks (skipped backends, ...)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def pick(self, full, quick, smoke):
        """The value for the current effort (sizes, blocksizes, ...)."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.effort.name]

    def rotation(self, sample, read_by_one=None) -> Rotation:
        """Copies of ``sample`` holding ``rotation_bytes``, counted over ``read_by_one`` (the
        part of a copy the function reading least of it reads) when the copy holds operands
        of several functions."""
        read = None if read_by_one is None else nbytes(read_by_one)
        return Rotation(sample, self.rotation_bytes, read)

    def compare(
        self, candidate: Callable, baseline: Callable, inputs: Cycle, floor: Timed | None = None
    ) -> Timing:
        return compare(candidate, baseline, inputs, self.settings, floor)

    def alone(self, fn: Callable, inputs: Cycle, floor: Timed | None = None) -> Timing:
        return alone(fn, inputs, self.settings, floor)

    def copy_floor(self, nbytes: int) -> Timed:
        """``dst.copy_(src)`` of uint8 buffers whose read + write is ``nbytes``, rotated."""
        half = max(1, nbytes // 2)
        src = torch.randint(0, 256, (half,), dtype=torch.uint8, device=self.device)
        return (lambda a: a[1].copy_(a[0])), self.rotation((src, torch.empty_like(src)))

    def candidate_backends(self) -> tuple[list[str], list[str]]:
        """(backends to benchmark against reference, notes on those skipped)."""
        import lowprec_kernels as lpk

        available = lpk.available_backends()
        wanted = self.settings.backends or NATIVE_BACKENDS.get(self.device, ())
        chosen = [b for b in wanted if b != "reference" and available.get(b)]
        skipped = [f"backend {b!r} is not available here" for b in wanted if not available.get(b)]
        return chosen, skipped

    def runs_natively(self, op: str, backend: str) -> bool:
        """Whether forcing ``backend`` really runs its own kernel for ``op`` here.

        A forced backend without a kernel falls back to reference silently; benchmarking
        that would print a meaningless 1.0x under the backend's name.
        """
        import lowprec_kernels as lpk
        from lowprec_kernels._dispatch import kernel_for

        with lpk.use_backend(backend):
            actual, _ = kernel_for(op, self.device)
        return actual == backend


# --------------------------------------------------------------------------- output


def _fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def header(machine: dict[str, Any], ceilings: Ceilings, settings: Settings) -> str:
    int8 = f"{ceilings.int8_gops:.0f} GOP/s" if ceilings.int8_gops else "n/a"
    lines = [
        f"machine: {machine['cpu_model']}, {machine['cores_available']} cores, "
        f"{machine['torch_threads']} torch threads, LLC {machine['llc_bytes'] >> 20} MiB, "
        f"torch {machine['torch']}" + (f", GPU {machine['gpu']}" if "gpu" in machine else ""),
        f"backends: {machine.get('available_backends', machine.get('error'))}",
        (
            f"ceilings ({settings.device}, best of runs): copy {ceilings.copy_gbps:.1f} GB/s, "
            + (f"read {ceilings.read_gbps:.1f} GB/s, " if ceilings.read_gbps else "")
            + (f"update {ceilings.update_gbps:.1f} GB/s, " if ceilings.update_gbps else "")
            + f"fp32 GEMM {ceilings.fp32_gflops:.0f} GFLOP/s, "
            f"bf16 GEMM {ceilings.bf16_gflops:.0f} GFLOP/s, int8 GEMM {int8}"
        ),
        *(f"  note: {n}" for n in ceilings.notes),
        f"effort: {settings.effort.name}: <= {settings.effort.pairs} interleaved rounds per row,"
        " medians, [IQR] over rounds",
        "  speedup = baseline time / time; vs copy_ = time of a copy_ of the same bytes / time"
        " (both per round); roof = roofline bound from the ceilings / time",
    ]
    return "\n".join(lines)


_COLUMNS = (
    ("what", "<", 22), ("shape", "<", 12), ("dtype", "<", 8), ("backend", "<", 9),
    ("time", ">", 9), ("baseline", ">", 18), ("speedup [IQR]", ">", 20), ("vs copy_ [IQR]", ">", 15),
    ("MB", ">", 7), ("GOP", ">", 6), ("GB/s", ">", 6), ("GOP/s", ">", 6), ("roof", ">", 12),
)  # fmt: skip


def _cells(row: Row, ceilings: Ceilings) -> list[str]:
    t, r = row.timing, row.roofline(ceilings)
    speedup = "-"
    if t.speedup is not None:
        lo, hi = t.speedup_iqr
        speedup = f"{t.speedup:.2f}x [{lo:.2f}-{hi:.2f}]"
    baseline = f"{row.baseline} {_fmt_time(t.baseline_seconds)}" if row.baseline else "-"
    vs_copy = "-"
    if t.floor_fraction is not None:
        lo, hi = t.floor_fraction_iqr
        vs_copy = f"{100 * t.floor_fraction:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"
    roof = "-"
    if r["limit"]:
        roof = f"{100 * r['roofline_fraction']:.0f}% {r['limit']}"
    return [
        row.what,
        "x".join(map(str, row.shape)),
        row.dtype,
        row.backend,
        _fmt_time(t.seconds),
        baseline,
        speedup,
        vs_copy,
        _fmt(row.bytes_moved / 1e6 if row.bytes_moved else None, ".1f"),
        _fmt(row.ops / 1e9 if row.ops else None, ".2f"),
        _fmt(r["gbps"], ".1f"),
        _fmt(r["gops"], ".0f"),
        roof,
    ]


def table(rows: Sequence[Row], ceilings: Ceilings) -> str:
    cells = [_cells(row, ceilings) for row in rows]
    # Each column as wide as its widest cell, at least its usual width: columns stay aligned.
    widths = [
        max([w, len(name), *(len(c[i]) for c in cells)]) for i, (name, _, w) in enumerate(_COLUMNS)
    ]

    def line(values):
        return "  ".join(format(v, f"{a}{w}") for v, (_, a, _), w in zip(values, _COLUMNS, widths))

    out = [line([name for name, _, _ in _COLUMNS])]
    for row, row_cells in zip(rows, cells):
        out.append(line(row_cells))
        if row.note:
            out.append(f"    note: {row.note}")
        noisy = [
            f"{side} median {_fmt_time(median)} vs best {_fmt_time(best)}"
            for side, median, best in _noisy_sides(row.timing)
        ]
        if noisy:
            out.append(f"    noisy: {'; '.join(noisy)} (machine busy? trust the ratios more)")
    return "\n".join(out)


def _noisy_sides(t: Timing) -> list[tuple[str, float, float]]:
    """The sides (candidate, baseline) whose median is far above their best sample: a shared
    machine slowed most rounds down, and the ratio of medians with it."""
    sides = [("ours", t.seconds, t.best_seconds)]
    if t.baseline_seconds is not None and t.baseline_best_seconds is not None:
        sides.append(("baseline", t.baseline_seconds, t.baseline_best_seconds))
    return [s for s in sides if t.pairs > 1 and s[1] > 3 * s[2]]


def report(
    machine: dict[str, Any],
    ceilings: Ceilings,
    settings: Settings,
    suites: dict[str, dict[str, Any]],
    argv: Sequence[str],
    duration_seconds: float | None = None,
) -> dict[str, Any]:
    """Everything a run measured, JSON-ready: suites maps name -> {status, rows, notes}."""
    return {
        "command": shlex.join(["python", "-m", "lowprec_kernels.bench", *argv]),
        "python_executable": sys.executable,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),  # when the run ended
        "duration_seconds": duration_seconds,
        "definitions": {
            "speedup": "baseline seconds / our seconds, the median of interleaved pairs "
            "(above 1: ours is faster); speedup_iqr: the pairs' interquartile range",
            "floor_fraction": "the time of a plain copy moving the row's bytes, interleaved "
            "with it / our time, the median of per-round ratios (1: copy speed)",
            "roofline_fraction": "the time of the row's roofline bound (its bytes at the "
            "measured bandwidth named by limit, its operations at the measured peak) / our "
            "median time",
        },
        "machine": machine,
        "ceilings": asdict(ceilings),
        "settings": {
            "device": settings.device,
            "backends": settings.backends,
            "effort": asdict(settings.effort),
        },
        "suites": {
            name: {**s, "rows": [row.as_dict(ceilings) for row in s.get("rows", [])]}
            for name, s in suites.items()
        },
    }


def write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def plot_label(row: Row) -> str:
    """A row's bar label: everything that tells it from the other rows of a run."""
    shape = "x".join(map(str, row.shape))
    versus = "" if row.baseline is None or " vs " in row.what else f" vs {row.baseline}"
    return f"{row.suite}: {row.what}{versus} {shape} {row.dtype} [{row.backend}]"


def plot(rows: Sequence[Row], path: str | os.PathLike) -> str:
    """Speedup bars with IQR whiskers; returns what happened (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not importable, plot skipped"
    rows = [r for r in rows if r.timing.speedup is not None]
    if not rows:
        return "--plot: no rows with a baseline, plot skipped"
    labels = [plot_label(r) for r in rows]
    speedups = [r.timing.speedup for r in rows]
    errors = [
        [s - r.timing.speedup_iqr[0] for s, r in zip(speedups, rows)],
        [r.timing.speedup_iqr[1] - s for s, r in zip(speedups, rows)],
    ]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    # One bar per row at its own position: bars given by label text would share a position
    # wherever two rows' labels agree, and only the longest of them would show.
    positions = range(len(rows))
    ax.barh(positions, speedups, xerr=errors)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("speedup vs baseline (median of interleaved pairs, IQR)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=plot_format(path))
    plt.close(fig)
    return f"--plot: wrote {path}"


def plot_format(path: str | os.PathLike) -> str:
    """The image format of ``path``: its extension, PNG without one (so that the file written
    is the one named)."""
    return Path(path).suffix.removeprefix(".").lower() or "png"

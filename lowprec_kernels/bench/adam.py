"""Benchmark suite ``adam``: one 8-bit AdamW step against full-precision and 8-bit baselines.

One parameter of N elements (fp32 or bf16) with its gradient. The candidate is
``lowprec_kernels.optim.AdamW8bit`` when that module exists, else the op
``adam8bit_step_`` called directly on the tensors (the optimizer's per-step work, without its
Python bookkeeping), under each native backend of the device. Each row times it interleaved
with one baseline, on the same parameter and gradient:

* ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)``: float states in the parameter's
  dtype (the speed target is the fused one);
* bitsandbytes' ``AdamW8bit`` when it is installed: the same 8-bit format.

Bytes: the traffic a step must move at least, per parameter: parameter read and written,
gradient read, each state read and written (8-bit: one byte each way, plus a float32 scale per
256; torch: the states in the parameter's dtype). The roofline is that traffic at the measured
in-place update bandwidth (``a.add_(b)``: read and written back in place, as a step does; it
moves more than a copy, whose writes also read each destination line); the "vs copy_" column
times a copy of the candidate's bytes in the same rounds.
The 8-bit kernels also read the gradient once more, before any write, to skip a step with a
non-finite gradient: that pass is not counted in the lower bound. State memory is reported
from the optimizers' actual tensors.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from lowprec_kernels.bench.harness import Bench, Cycle, Row

SUITE = "adam"
DTYPES = (torch.float32, torch.bfloat16)
LR, WEIGHT_DECAY, BLOCKSIZE = 1e-3, 1e-2, 256


def state_bytes_8bit(n: int) -> int:
    """Two 8-bit codes per parameter and two float32 scales per block."""
    return 2 * n + 2 * 4 * -(-n // BLOCKSIZE)


def step_bytes_8bit(n: int, dtype: torch.dtype) -> int:
    """Lower bound of one 8-bit step's traffic: p read + written, g read, codes read + written."""
    return 3 * n * dtype.itemsize + 2 * state_bytes_8bit(n)


def step_bytes_torch(n: int, dtype: torch.dtype) -> int:
    """p read + written, g read, exp_avg and exp_avg_sq read + written (in p's dtype)."""
    return 7 * n * dtype.itemsize


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(state) for state in opt.state.values())


def _lowprec_adamw8bit():
    """``lowprec_kernels.optim.AdamW8bit``, or None while the optimizer is not written.

    Only a module of this very package counts: an editable install of another checkout can
    answer for a submodule that this one lacks.
    """
    import lowprec_kernels

    try:
        module = importlib.import_module("lowprec_kernels.optim")
    except ModuleNotFoundError as e:
        if e.name == "lowprec_kernels.optim":
            return None
        raise
    package_dir = Path(lowprec_kernels.__file__).resolve().parent
    if package_dir not in Path(module.__file__).resolve().parents:
        return None
    return getattr(module, "AdamW8bit", None)


def _bnb_adamw8bit():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.optim.AdamW8bit


class OpStep:
    """The candidate without an optimizer class: ``adam8bit_step_`` on one tensor's state."""

    def __init__(self, param: torch.nn.Parameter):
        from lowprec_kernels.functional import dynamic_map

        n, device = param.numel(), param.device
        nb = -(-n // BLOCKSIZE)
        self.param = param
        self.state1 = torch.zeros(param.shape, dtype=torch.uint8, device=device)
        self.state2 = torch.zeros(param.shape, dtype=torch.uint8, device=device)
        self.absmax1 = torch.zeros(nb, device=device)
        self.absmax2 = torch.zeros(nb, device=device)
        self.qmap1 = dynamic_map(signed=True, device=device)
        self.qmap2 = dynamic_map(signed=False, device=device)
        self.count = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)

    def step(self):
        torch.ops.lowprec.adam8bit_step_(
            self.param.data, self.param.grad, self.state1, self.state2, self.absmax1,
            self.absmax2, self.qmap1, self.qmap2, self.count, self.skipped,
            LR, 0.9, 0.999, 1e-8, WEIGHT_DECAY, True, 1.0, BLOCKSIZE,
        )  # fmt: skip

    @property
    def state(self):
        return {self.param: {"state1": self.state1, "state2": self.state2,
                             "absmax1": self.absmax1, "absmax2": self.absmax2}}  # fmt: skip


def _forced(backend: str, name: str) -> Callable:
    """Steps optimizer ``name`` of a rotation item with every lowprec op run by ``backend``."""
    import lowprec_kernels as lpk

    def call(item):
        context = lpk.use_backend(backend) if backend else contextlib.nullcontext()
        with context:
            item[name].step()

    return call


def _copies(bench: Bench, n: int, dtype: torch.dtype, makers: dict, bytes_per_copy: int):
    """Rotation items: independent (parameter, optimizers) sets, enough of them that one
    candidate's traffic over the set exceeds ``bench.rotation_bytes`` (one set when it alone
    does: the baselines then hold the same parameter, which no cache keeps between calls)."""
    count = max(1, -(-bench.rotation_bytes // bytes_per_copy))
    items = []
    for _ in range(count):
        param = torch.nn.Parameter(
            torch.randn(n, dtype=torch.float32, device=bench.device).to(dtype)
        )
        param.grad = torch.randn_like(param) * 1e-2
        item = {name: make(param) for name, make in makers.items()}
        items.append(item)
    return Cycle(items)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rows(bench: Bench) -> list[Row]:
    sizes = bench.pick(full=(1 << 20, 1 << 24, 1 << 26), quick=(1 << 20, 1 << 24), smoke=(5000,))
    candidates, skipped = bench.candidate_backends()
    for message in skipped:
        bench.note(message)
    adamw8bit = _lowprec_adamw8bit()
    op_name = "adam8bit_multi_step_" if adamw8bit is not None else "adam8bit_step_"
    if adamw8bit is None:
        bench.note("lowprec_kernels.optim.AdamW8bit not available: timing adam8bit_step_ on the "
                   "tensors directly (no optimizer bookkeeping)")  # fmt: skip
        what_prefix = "op step"

        def make_ours(param):
            return OpStep(param)
    else:
        what_prefix = "AdamW8bit"

        def make_ours(param):
            return adamw8bit([param], lr=LR, weight_decay=WEIGHT_DECAY)

    makers = {"ours": make_ours}
    baselines = {
        "torch fused": lambda p: torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY,
                                                   fused=True),
        "torch foreach": lambda p: torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY,
                                                     foreach=True),
    }  # fmt: skip
    bnb_adamw8bit = _bnb_adamw8bit()
    if bnb_adamw8bit is not None:
        baselines["bnb AdamW8bit"] = lambda p: bnb_adamw8bit([p], lr=LR,
                                                            weight_decay=WEIGHT_DECAY)  # fmt: skip
    else:
        bench.note("bitsandbytes is not installed: no bnb AdamW8bit baseline")
    makers.update(baselines)

    out = []
    for dtype in DTYPES:
        for n in sizes:
            ours_bytes = step_bytes_8bit(n, dtype)
            torch_bytes = step_bytes_torch(n, dtype)
            per_copy = 2 * n * dtype.itemsize + state_bytes_8bit(n)
            items = _copies(bench, n, dtype, makers, per_copy)
            usable = {}
            for name in makers:  # first step: allocates the states (and checks the baseline runs)
                try:
                    for item in items.copies:
                        item[name].step()
                    usable[name] = True
                except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a note
                    bench.note(f"{name} on {bench.device} {_dtype_name(dtype)}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}")  # fmt: skip
                    usable[name] = False
            if not usable["ours"]:
                continue
            first = items.copies[0]
            ours_state = optimizer_state_bytes(first["ours"])
            state_note = (f"state {ours_state / n:.2f} B/param")  # fmt: skip
            if usable.get("torch fused"):
                torch_state = optimizer_state_bytes(first["torch fused"])
                state_note += (f" = {100 * ours_state / torch_state:.1f}% of torch's "
                               f"{torch_state / n:.2f}")  # fmt: skip
            state_note += (f"; traffic {ours_bytes / n:.2f} B/param vs torch "
                           f"{torch_bytes / n:.2f}")  # fmt: skip
            floor = bench.copy_floor(ours_bytes)
            for backend in candidates:
                if not bench.runs_natively(op_name, backend):
                    bench.note(f"backend {backend!r} has no {op_name} kernel on {bench.device}")
                    continue
                candidate = _forced(backend, "ours")
                for i, name in enumerate(baselines):
                    if not usable[name]:
                        continue
                    timing = bench.compare(candidate, _forced("", name), items,
                                           floor if i == 0 else None)  # fmt: skip
                    out.append(Row(SUITE, f"{what_prefix} vs {name}", (n,), _dtype_name(dtype),
                                   backend, timing, baseline=name, bytes_moved=ours_bytes,
                                   in_place=True, note=state_note if i == 0 else ""))  # fmt: skip
            del items
    return out

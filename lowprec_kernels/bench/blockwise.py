"""Suite ``blockwise``: 8-bit blockwise quantize / dequantize with the signed dynamic map.

Each native backend of the device (``cpu`` on CPU; ``cuda``, ``triton`` on CUDA) is timed
against the package's ``reference`` backend, interleaved, through the same public functions
(``lowprec_kernels.functional``) with the backend forced by ``use_backend``: the baseline is
the reference the tests check against, not a copy of it. Both kernels are memory-bound, so
the roofline is the measured copy bandwidth. A plain ``copy_`` moving the same bytes is
printed as a row for scale, and also interleaved with every kernel row ("vs copy_"), which
gives the fraction of copy speed reached even when the machine's bandwidth drifts. When
bitsandbytes is installed, its ``quantize_blockwise`` / ``dequantize_blockwise`` (the same
format, the same map and blocksize) are a second baseline of each native backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowprec_kernels.bench.harness import Bench, Row

SUITE = "blockwise"
DTYPES = (torch.float32, torch.bfloat16)


def quantize_bytes(n: int, dtype: torch.dtype, blocksize: int) -> int:
    """Input read + one code byte written per element + one fp32 absmax per block written."""
    return n * dtype.itemsize + n + 4 * -(-n // blocksize)


def dequantize_bytes(n: int, dtype: torch.dtype, blocksize: int) -> int:
    """Codes + absmax read, output written: the same traffic as quantize, reversed."""
    return quantize_bytes(n, dtype, blocksize)


def _forced(backend: str, fn: Callable) -> Callable:
    """``fn(*args)`` with every lowprec op in it run by ``backend``."""
    import lowprec_kernels as lpk

    def call(args):
        with lpk.use_backend(backend):
            return fn(*args)

    return call


def _bnb_functional():
    """bitsandbytes.functional, or None when bitsandbytes is not installed."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def _usable(bench: Bench, name: str, fn: Callable, inputs) -> bool:
    """Whether the baseline ``fn`` runs on these inputs here; a note when it does not."""
    try:
        fn(inputs.copies[0])
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a note
        bench.note(f"{name} on {bench.device}: {type(e).__name__}: {str(e).splitlines()[0]}")
        return False
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _scale_rows(bench: Bench, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> list[Row]:
    """Plain torch moving ``nbytes`` (read + write) of uint8: the floor the kernels aim at.

    ``copy_`` writes into an existing tensor; ``clone`` allocates its output as the kernels
    do, so it also pays what a fresh allocation costs (page faults for large outputs).
    """
    copy, pairs = bench.copy_floor(nbytes)
    copied = bench.alone(copy, pairs)
    cloned = bench.alone(lambda a: a[0].clone(), pairs)
    moved, name = nbytes // 2 * 2, _dtype_name(dtype)
    return [
        Row(SUITE, "copy_ (same bytes)", shape, name, "torch", copied, bytes_moved=moved),
        Row(SUITE, "clone (same bytes)", shape, name, "torch", cloned, bytes_moved=moved),
    ]


def _op_rows(
    bench: Bench,
    what: str,
    op: str,
    fn: Callable,
    inputs,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    nbytes: int,
    candidates: list[str],
    bnb: tuple[str, Callable] | None = None,
) -> list[Row]:
    """``op`` under each candidate backend vs reference (and vs ``bnb``: (name, its call)
    when given and it runs); reference alone if no backend runs it."""
    rows = []
    baseline = _forced("reference", fn)
    floor = bench.copy_floor(nbytes)
    if bnb is not None and not _usable(bench, *bnb, inputs):
        bnb = None
    for backend in candidates:
        if not bench.runs_natively(op, backend):
            bench.note(f"backend {backend!r} has no {op} kernel on {bench.device} (skipped)")
            continue
        timing = bench.compare(_forced(backend, fn), baseline, inputs, floor)
        rows.append(Row(SUITE, what, shape, _dtype_name(dtype), backend, timing,
                        baseline="reference", bytes_moved=nbytes))  # fmt: skip
        if bnb is not None:
            bnb_name, bnb_call = bnb
            timing = bench.compare(_forced(backend, fn), bnb_call, inputs)
            rows.append(Row(SUITE, what, shape, _dtype_name(dtype), backend, timing,
                            baseline=bnb_name, bytes_moved=nbytes))  # fmt: skip
    if not rows:
        timing = bench.alone(baseline, inputs, floor)
        rows.append(Row(SUITE, what, shape, _dtype_name(dtype), "reference", timing,
                        bytes_moved=nbytes, note="no native backend to compare"))  # fmt: skip
    return rows


def rows(bench: Bench) -> list[Row]:
    import lowprec_kernels as lpk
    from lowprec_kernels import functional as LF

    shape = bench.pick(full=(4096, 4096), quick=(2048, 2048), smoke=(37, 111))
    blocksizes = bench.pick(full=(64, 256, 4096), quick=(256,), smoke=(256,))
    n = shape[0] * shape[1]
    code = LF.dynamic_map(signed=True).to(bench.device)
    candidates, skipped = bench.candidate_backends()
    for message in skipped:
        bench.note(message)
    bnb = _bnb_functional()
    if bnb is None:
        bench.note("bitsandbytes is not installed: no bnb quantize/dequantize_blockwise baseline")
    bench.note(
        "times include allocating the outputs, as a user's call does; on the CPU the allocator"
        " hands each call the memory the previous call's output freed, partly still cached, so"
        " writes can beat the copy ceiling (the clone row shows it for plain torch, roof > 100%)"
    )

    out = []
    for dtype in DTYPES:
        x = torch.randn(shape, dtype=dtype, device=bench.device)
        out += _scale_rows(bench, shape, dtype, quantize_bytes(n, dtype, 256))
        xs = bench.rotation((x,))
        for bs in blocksizes:
            with lpk.use_backend("reference"):
                q, absmax = LF.quantize_blockwise(x, code=code, blocksize=bs)
            qs = bench.rotation((q, absmax))

            def quantize(t, bs=bs):
                return LF.quantize_blockwise(t, code=code, blocksize=bs)

            def dequantize(q, absmax, bs=bs, dtype=dtype):
                return LF.dequantize_blockwise(q, absmax, code=code, blocksize=bs, dtype=dtype)

            bnb_quantize = bnb_dequantize = None
            if bnb is not None:

                def bnb_q(args, bs=bs):
                    return bnb.quantize_blockwise(args[0], code=code, blocksize=bs)

                def bnb_dq(args, bs=bs, dtype=dtype):  # its output in dtype, as ours
                    state = bnb.QuantState(absmax=args[1], code=code, blocksize=bs, dtype=dtype)
                    return bnb.dequantize_blockwise(args[0], quant_state=state)

                bnb_quantize = ("bnb quantize_blockwise", bnb_q)
                bnb_dequantize = ("bnb dequantize_blockwise", bnb_dq)
            nbytes = quantize_bytes(n, dtype, bs)
            out += _op_rows(bench, f"quantize bs={bs}", "quantize_blockwise", quantize, xs,
                            shape, dtype, nbytes, candidates, bnb_quantize)  # fmt: skip
            nbytes = dequantize_bytes(n, dtype, bs)
            out += _op_rows(bench, f"dequantize bs={bs}", "dequantize_blockwise", dequantize, qs,
                            shape, dtype, nbytes, candidates, bnb_dequantize)  # fmt: skip
            del q, absmax, qs
    return out

"""NF4 GEMV on CUDA (matmul_4bit, rows of x <= 8): correctness, then device and host times.

Standalone, one GPU, under a minute on an H200::

    PYTHONPATH=. python3 benchmarks/cuda_gemv_check.py      # from the repository root

1. Correctness: the ``cuda`` backend's matmul_4bit against the float64 product of x and the
   reference-decoded weight, within the bound of tests/test_fourbit_kernels.py (fp32
   accumulation of K products plus one rounding into x's dtype), for M = 1..8, fp32 / bf16 /
   fp16, blocksize 64 double-quantized and 128 plain, K % 8 == 0 (word path), odd K and
   misaligned x (element path), short wide weights (several warps per row), bias.
2. Timing at 4096 x 4096 (and a few more shapes): median over 50 calls after warmup, weights
   cycled over 8 copies so the 60 MB L2 does not hold them, each call between its own pair of
   CUDA events. Three numbers per row:

   * ``dev``: device time per call. All 50 calls are queued behind a ``torch.cuda._sleep``
     long enough for the host to enqueue them, so host gaps are not counted (``!`` after the
     number means the host did not finish enqueueing in time and the number is suspect);
   * ``e2e``: back-to-back calls from Python, as the benchmark suite times them: the larger of
     host and device time;
   * ``host``: Python-side time per call of the whole op (dispatcher, checks, launch).

   ``kernel`` rows call the native binding directly (``_C.matmul_4bit_gemv_cuda``), ``op``
   rows go through ``torch.ops.lowprec.matmul_4bit``; ``F.linear`` runs on the dequantized
   weight in x's dtype. GB/s counts the bytes each must move (packed codes + scale codes +
   x + y; the dense weight for F.linear) over ``dev``.

Exit status 1 if any correctness case fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lowprec_kernels as lpk
from lowprec_kernels import _C
from lowprec_kernels import functional as LF
from lowprec_kernels.bench.harness import script_description
from lowprec_kernels.reference import fourbit as reference_fourbit

RUNS = 50
WARMUP = 5
COPIES = 8
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEV = "cuda"


def quantize(out_f, in_f, blocksize, double_quant, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * in_f**-0.5).to(DEV)
    return LF.quantize_4bit(w, blocksize, "nf4", double_quant=double_quant)


def dequantized64(qw, st):
    with lpk.use_backend("reference"):
        return LF.dequantize_4bit(qw, st, torch.float32).double()


def within_bound(y, x, W64, bias):
    """(max excess over the tests' bound (<= 0 passes), max relative error): the bound is
    reference.fourbit.matmul_4bit_error_excess, which tests/test_fourbit_kernels.py uses."""
    y64, scale = reference_fourbit.matmul_4bit_float64(x, W64, bias)
    excess = reference_fourbit.matmul_4bit_error_excess(y, y64, scale, x.dtype, x.shape[-1])
    err = (y.double().reshape(y64.shape) - y64).abs()
    return excess.max().item(), (err / scale.clamp_min(1e-30)).max().item()


def correctness() -> bool:
    print("== correctness: cuda matmul_4bit vs float64 product (bound of the tests)")
    cases = [
        # (out, in, blocksize, double_quant, dtypes, rows, bias, misalign x)
        (4096, 4096, 64, True, (torch.float32, torch.bfloat16), (1, 4, 8), False, False),
        (256, 1000, 128, False, (torch.float32, torch.bfloat16), (1, 4, 8), True, False),
        (37, 200, 64, True, (torch.float32, torch.float16, torch.bfloat16), (1, 3, 8), True, False),
        (23, 4097, 64, True, (torch.float32, torch.bfloat16), (1, 4, 8), True, False),
        (41, 131, 32, False, (torch.float32, torch.bfloat16), (1, 2, 8), False, False),
        (64, 8192, 64, True, (torch.float32, torch.bfloat16), (1, 5, 8), False, False),
        (300, 520, 64, True, (torch.float32, torch.bfloat16), (1, 7), False, True),
        (11008, 4096, 64, True, (torch.bfloat16,), (1, 6), False, False),
    ]
    ok = True
    lines = 0
    for out_f, in_f, bs, dq, dtypes, rows_list, with_bias, misalign in cases:
        qw, st = quantize(out_f, in_f, bs, dq, seed=out_f + in_f)
        W64 = dequantized64(qw, st)
        for dtype in dtypes:
            for rows in rows_list:
                g = torch.Generator(device="cpu").manual_seed(rows)
                x = torch.randn(rows, in_f, generator=g).to(DEV, dtype)
                if misalign:  # same values, data pointer off by one element: element path
                    buf = torch.empty(rows * in_f + 1, device=DEV, dtype=dtype)
                    buf[1:].copy_(x.reshape(-1))
                    x = buf[1:].view(rows, in_f)
                bias = torch.randn(out_f, generator=g).to(DEV, dtype) if with_bias else None
                with lpk.use_backend("cuda"):
                    y = LF.matmul_4bit(x, qw, st, bias)
                torch.cuda.synchronize()
                finite = bool(torch.isfinite(y).all())
                excess, rel = within_bound(y, x, W64, bias)
                good = finite and excess <= 0
                ok &= good
                lines += 1
                path = "elem" if (in_f % 8 or misalign) else "word"
                print(
                    f"  {'ok  ' if good else 'FAIL'} {out_f:>5}x{in_f:<5} bs={bs:<3}"
                    f" {'dq' if dq else '  '} {NAMES[dtype]} M={rows} {'bias' if with_bias else '    '}"
                    f" {path}  max rel err {rel:.2e}  excess {excess:+.2e}"
                )
    print(f"  {'all ' + str(lines) + ' cases ok' if ok else 'FAILURES above'}")
    return ok


# --------------------------------------------------------------------------- timing


def _sleep_cycles_per_us() -> float:
    props = torch.cuda.get_device_properties(0)
    rate = getattr(props, "clock_rate", 0) or 1_980_000  # kHz
    return rate / 1e3


def device_times(fn, items):
    """Per-call device time (us) of fn(item) over RUNS calls queued behind a GPU sleep."""
    for i in range(WARMUP):
        fn(items[i % len(items)])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(RUNS):
        fn(items[i % len(items)])
    host_total = time.perf_counter() - t0
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(RUNS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(RUNS)]
    sleep_us = 3.0 * host_total * 1e6 + 2000.0
    before_sleep = torch.cuda.Event(enable_timing=True)
    before_sleep.record()
    torch.cuda._sleep(int(sleep_us * _sleep_cycles_per_us()))
    t0 = time.perf_counter()
    for i in range(RUNS):
        starts[i].record()
        fn(items[i % len(items)])
        ends[i].record()
    enqueue_us = (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    # The sleep must outlast the enqueueing, or the GPU waited for the host between calls.
    suspect = before_sleep.elapsed_time(starts[0]) * 1e3 < enqueue_us
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return statistics.median(times), suspect


def e2e_and_host(fn, items):
    """(back-to-back us per call by events, host us per call)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for i in range(RUNS):
        fn(items[i % len(items)])
    host = (time.perf_counter() - t0) / RUNS * 1e6
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / RUNS, host


def weight_bytes(out_f, in_f, bs, dq):
    n = out_f * in_f
    blocks = -(-n // bs)
    return (n + 1) // 2 + (blocks + 4 * -(-blocks // 256) + 4 if dq else 4 * blocks)


def timing() -> None:
    print(
        f"\n== timing: median of {RUNS} calls, {COPIES} weight copies cycled; dev = device"
        " time (host gaps hidden), e2e = back-to-back from Python, host = Python per call"
    )
    header = (
        f"  {'shape MxKxN':<16} {'dtype':<5} {'what':<9} {'dev us':>8} {'GB/s':>7}"
        f" {'e2e us':>8} {'host us':>8} {'vs F.linear dev':>16}"
    )
    print(header)
    shapes = [(4096, 4096, 64, True, (1, 4, 8)), (11008, 4096, 64, True, (1,)),
              (4096, 11008, 64, True, (1,)), (4096, 4096, 128, False, (1,))]  # fmt: skip
    for out_f, in_f, bs, dq, rows_list in shapes:
        qw, st = quantize(out_f, in_f, bs, dq)
        copies = [(qw.clone(), st.absmax.clone(), None if not dq else st.nested_absmax.clone())
                  for _ in range(COPIES)]  # fmt: skip
        W32 = LF.dequantize_4bit(qw, st, torch.float32)
        wbytes = weight_bytes(out_f, in_f, bs, dq)
        for dtype in (torch.float32, torch.bfloat16):
            dense = [W32.to(dtype) for _ in range(COPIES)]
            for rows in rows_list:
                x = torch.randn(rows, in_f, device=DEV).to(dtype)
                out = torch.empty(rows, out_f, device=DEV, dtype=dtype)
                io = rows * (in_f + out_f) * x.element_size()

                # code, blocksize, nested code, offset, nested blocksize: shared by the copies
                fixed = (st.code, bs, st.nested_code, st.offset, st.nested_blocksize)
                shape = [out_f, in_f]

                def kernel(c, x=x, out=out, f=fixed):
                    _C.matmul_4bit_gemv_cuda(x, c[0], c[1], f[0], f[1], c[2], *f[2:], None, out)

                def op(c, x=x, f=fixed, shape=shape):
                    return torch.ops.lowprec.matmul_4bit(
                        x, c[0], c[1], f[0], f[1], shape, c[2], *f[2:], None
                    )

                def linear(w, x=x):
                    return F.linear(x, w)

                rows_out = []
                with lpk.use_backend("cuda"):
                    for what, fn, items, nbytes in (
                        ("kernel", kernel, copies, wbytes + io),
                        ("op", op, copies, wbytes + io),
                        ("F.linear", linear, dense, W32.numel() * x.element_size() + io),
                    ):
                        dev, suspect = device_times(fn, items)
                        e2e, host = e2e_and_host(fn, items)
                        rows_out.append((what, dev, suspect, e2e, host, nbytes))
                lin_dev = rows_out[-1][1]
                for what, dev, suspect, e2e, host, nbytes in rows_out:
                    ratio = "" if what == "F.linear" else f"{lin_dev / dev:.2f}x"
                    print(
                        f"  {f'{rows}x{in_f}x{out_f}':<16} {NAMES[dtype]:<5} {what:<9}"
                        f" {dev:>7.1f}{'!' if suspect else ' '} {nbytes / dev / 1e3:>7.0f}"
                        f" {e2e:>8.1f} {host:>8.1f} {ratio:>16}"
                    )
            del dense
        del copies, W32
        torch.cuda.empty_cache()
    print(
        "  before (bench-cuda.txt, H200, op e2e): 1x4096x4096 fp32 141 us, bf16 97.8 us;"
        " 4x4096x4096 fp32 141 us, bf16 106 us"
    )


def main() -> int:
    argparse.ArgumentParser(description=script_description(__doc__)).parse_args()
    if not torch.cuda.is_available():
        print("cuda_gemv_check: no CUDA device")
        return 2
    if not hasattr(_C, "matmul_4bit_gemv_cuda"):
        print("cuda_gemv_check: the extension was built without CUDA")
        return 2
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    t0 = time.perf_counter()
    ok = correctness()
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    try:
        timing()
    except Exception as exc:  # noqa: BLE001 - timing is informative; correctness decides
        print(f"timing failed: {type(exc).__name__}: {exc}")
    print(f"total {time.perf_counter() - t0:.1f} s; correctness {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

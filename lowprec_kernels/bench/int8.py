"""Suite ``int8``: the LLM.int8 forward (``int8_linear``) and its GEMM (``int8_scaled_mm``).

Shapes: x [M, 4096] @ W [4096, 4096].T for M in 1, 16, 128, 512, 2048 (``--quick``: 1 and
512), activations with 0, 0.1 % and 1 % outlier columns (``--quick``: 0.1 %) at threshold 6.
Every row times a native backend of the device (``cpu``; ``cuda``/``triton`` on a GPU)
interleaved with one baseline, on rotated inputs (weights and activations past the last-level
cache), and reports the median of the per-pair ratios:

* ``F.linear`` in the same compute dtype (bf16, and fp32 for the fp32 rows), the dense layer
  LLM.int8 replaces;
* ``torch._int_mm`` + a separate dequantization pass (``acc * row * col / 127**2`` to bf16),
  given already-quantized activations: the int8 GEMM torch ships, with what it leaves undone;
* bitsandbytes ``Linear8bitLt`` (when installed) on the same activations and threshold.

``ops`` counts the int8 GEMM (2 M N K), so "roof" is the fraction of the machine's measured
int8 GEMM rate (``torch._int_mm``, n = 2048) or of copy bandwidth, whichever binds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowprec_kernels.bench.harness import Bench, Row, inference
from lowprec_kernels.reference.int8 import INT8_SCALE, int8_dequantize_weight

SUITE = "int8"
THRESHOLD = 6.0
# Magnitude range of the planted outlier columns (the rest of x is clamped to +-3).
OUTLIER_MAGNITUDE = (8.0, 30.0)
INLIER_LIMIT = 3.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _activations(M: int, K: int, fraction: float, dtype, device) -> torch.Tensor:
    """x with round(fraction * K) outlier columns, spread evenly, in every row."""
    g = torch.Generator().manual_seed(M * 7919 + int(fraction * 1e6))
    x = torch.randn(M, K, generator=g).clamp_(-INLIER_LIMIT, INLIER_LIMIT)
    count = round(fraction * K)
    if count:
        cols = torch.linspace(0, K - 1, count).round().long()
        low, high = OUTLIER_MAGNITUDE
        magnitude = low + (high - low) * torch.rand(M, count, generator=g)
        x[:, cols] = magnitude * torch.sign(torch.randn(M, count, generator=g))
    return x.to(device=device, dtype=dtype)


def _row(what, shape, dtype, backend, timing, baseline) -> Row:
    """A row whose ops are the int8 GEMM's and whose bytes are W (int8), x and out."""
    M, K, N = shape
    nbytes = N * K + (M * K + M * N) * dtype.itemsize
    return Row(SUITE, what, shape, _dtype_name(dtype), backend, timing, baseline=baseline,
               bytes_moved=nbytes, ops=2 * M * N * K, compute="int8")  # fmt: skip


def _forced(backend: str, fn: Callable) -> Callable:
    import lowprec_kernels as lpk

    def call(args):
        with lpk.use_backend(backend):
            return fn(*args)

    return call


def _int_mm_dequant(xq, row_stats, wq, w_scale, out_dtype):
    """torch's int8 GEMM, then the dequantization as a second pass over the int32 result."""
    acc = torch._int_mm(xq, wq.t())
    return (acc * (row_stats.unsqueeze(1) * (w_scale / INT8_SCALE**2))).to(out_dtype)


def _bnb_layer(wq: torch.Tensor, w_scale: torch.Tensor, device):
    """A bitsandbytes Linear8bitLt holding the same int8 weight, in eval mode as its users run
    inference (in training mode, its default, its CPU forward dequantizes the whole weight
    and calls F.linear), or None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    N, K = wq.shape
    layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=THRESHOLD)
    weight = int8_dequantize_weight(wq, w_scale, torch.float32).cpu()
    layer.load_state_dict({"weight": weight}, strict=False)
    return layer.to(device).eval()


def _drop_cast_notices(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def rows(bench: Bench) -> list[Row]:
    # bitsandbytes logs that it casts bf16 inputs to fp16 (the cast is part of its time),
    # once per layer: not a result, and it would scatter lines over the table.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    logger.addFilter(_drop_cast_notices)
    try:
        return _rows(bench)
    finally:
        logger.removeFilter(_drop_cast_notices)


def _rows(bench: Bench) -> list[Row]:
    import lowprec_kernels as lpk
    from lowprec_kernels import functional as LF

    device = bench.device
    K = N = bench.pick(full=4096, quick=4096, smoke=96)
    Ms = bench.pick(full=(1, 16, 128, 512, 2048), quick=(1, 512), smoke=(1, 5))
    fractions = bench.pick(full=(0.0, 0.001, 0.01), quick=(0.001,), smoke=(0.01,))
    candidates, skipped = bench.candidate_backends()
    for message in skipped:
        bench.note(message)
    bench.note(
        "int8_linear rows time the whole forward from bf16/fp32 x (outlier search, row "
        "quantization, int8 GEMM, outlier term, bias-free epilogue); _int_mm+dequant is given "
        "x already quantized"
    )

    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g).to(device)
    with lpk.use_backend("reference"):
        wq, w_scale = LF.int8_quantize_weight(W)
    w_bf16 = W.to(torch.bfloat16)
    w_fp32 = W
    del W
    bnb_available = _bnb_layer(wq[:8, :8].contiguous(), w_scale[:8], device) is not None
    if not bnb_available:
        bench.note("bitsandbytes not installed: no Linear8bitLt rows")
    # The other baselines are timed at one outlier fraction (the GEMMs do not depend on it).
    main_fraction = 0.001 if 0.001 in fractions else fractions[0]

    out: list[Row] = []
    for M in Ms:
        shape = (M, K, N)
        for backend in candidates:
            if not bench.runs_natively("int8_linear", backend):
                bench.note(f"backend {backend!r} has no int8_linear kernel on {device} (skipped)")
                continue
            linear = _forced(
                backend, lambda x, wq, ws, *rest: LF.int8_linear(x, wq, ws, None, THRESHOLD)
            )

            for fraction in fractions:
                tag = f"int8_linear out={100 * fraction:g}%"
                x = _activations(M, K, fraction, torch.bfloat16, device)
                # vs the dense bf16 layer
                # Our op reads x, wq and w_scale, F.linear x and w_bf16: counted over the
                # smaller, so that neither cycles over copies that fit the cache.
                inputs = bench.rotation((x, wq, w_scale, w_bf16), read_by_one=(x, wq, w_scale))
                timing = bench.compare(linear, lambda a: F.linear(a[0], a[3]), inputs)
                out.append(_row(tag, shape, torch.bfloat16, backend, timing, "F.linear bf16"))
                del inputs
                if fraction != main_fraction:
                    continue
                # vs torch's int8 GEMM + a dequant pass, on pre-quantized activations (CUDA's
                # _int_mm needs M > 16)
                if device == "cpu" or M > 16:
                    with lpk.use_backend("reference"):
                        xq, row_stats, _ = LF.int8_vectorwise_quant(x, 0.0)
                    inputs = bench.rotation((x, wq, w_scale, xq, row_stats))
                    baseline = lambda a: _int_mm_dequant(a[3], a[4], a[1], a[2], torch.bfloat16)
                    timing = bench.compare(linear, baseline, inputs)
                    out.append(_row(tag, shape, torch.bfloat16, backend, timing, "_int_mm+dequant"))
                    scaled_mm = _forced(backend, lambda x, wq, ws, xq, rs: LF.int8_scaled_mm(
                        xq, rs, wq, ws, None, torch.bfloat16))  # fmt: skip
                    timing = bench.compare(scaled_mm, baseline, inputs)
                    out.append(_row("int8_scaled_mm (GEMM)", shape, torch.bfloat16, backend, timing,
                                   "_int_mm+dequant"))  # fmt: skip
                    del inputs
                # vs bitsandbytes
                if bnb_available:
                    inputs = bench.rotation((x, wq, w_scale))
                    layers = [_bnb_layer(c[1], c[2], device) for c in inputs.copies]
                    inputs.copies = [(*c, layer) for c, layer in zip(inputs.copies, layers)]
                    timing = bench.compare(linear, lambda a: inference(a[3], a[0]), inputs)
                    out.append(
                        _row(tag, shape, torch.bfloat16, backend, timing, "bnb Linear8bitLt")
                    )
                    del inputs, layers
                # fp32 activations vs the dense fp32 layer
                x32 = x.float()
                inputs = bench.rotation((x32, wq, w_scale, w_fp32), read_by_one=(x32, wq, w_scale))
                timing = bench.compare(linear, lambda a: F.linear(a[0], a[3]), inputs)
                out.append(_row(tag, shape, torch.float32, backend, timing, "F.linear fp32"))
                del inputs
    return out

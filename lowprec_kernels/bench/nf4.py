"""Suite ``nf4``: the fused 4-bit dequant-matmul (``matmul_4bit``), NF4 with double quant.

For each weight shape (out x in) and number of rows M of x, interleaved rounds run, in turn:
our op for each candidate backend with x in fp32 and in bf16 (compute dtype = x's),
``F.linear`` in fp32 and in bf16 on the same weights dequantized, and a ``copy_`` of the bytes
our op must move; then, in rounds of their own, our op and bitsandbytes' ``matmul_4bit`` on
the same packed weights (its checkpoints and ours are one format) when it is installed (a
bitsandbytes CPU call slows the next multi-threaded op of the process, so it is kept out of
the F.linear rounds). Each function reads its own weight copies, cycled past the last-level
cache (several distinct copies per function), so every call streams its weights from memory
as a real layer does. Reported:

* speedup vs ``F.linear`` in the same compute dtype (the targets compare like with like), vs
  ``F.linear`` fp32 for bf16 x as well, and vs bitsandbytes;
* bytes moved by our op: packed codes + absmax codes + nested absmax + x + y, and the
  fraction of the measured read bandwidth reached (``roof``: a large ``amax()``, since the op
  only reads; for large M the GEMM rate binds instead), plus ``vs copy_``, the fraction of the
  rate of a copy (read + write bytes) measured in the same rounds;
* rows for the baselines themselves, with the bytes they move (their dense weights).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowprec_kernels.bench.harness import Bench, Cycle, Row, Timing, _measure, _timing, inference

SUITE = "nf4"
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
_GEMM_KIND = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def weight_bytes(out_features: int, in_features: int, blocksize: int = BLOCKSIZE) -> int:
    """Packed codes + one uint8 absmax code per block + fp32 nested absmax and offset."""
    n = out_features * in_features
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


def traffic(rows: int, out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes our op must move at least: the 4-bit weight once, x read, y written."""
    activations = rows * (in_features + out_features) * dtype.itemsize
    return weight_bytes(out_features, in_features) + activations


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return bitsandbytes, bnb_functional


def _bnb_layer(bnb, copy, state, dtype: torch.dtype):
    """A bitsandbytes Linear4bit as its users run it (eval mode, compute_dtype = x's dtype)
    holding one rotated copy of our weight, called once (its first CPU call repacks the codes
    for its kernel, in place: hence a clone of ours)."""
    bitsandbytes, bnb_functional = bnb
    packed, absmax, nested_absmax = copy
    out_f, in_f = state.shape
    d = {**state.as_dict(), "absmax": absmax.clone(), "nested_absmax": nested_absmax.clone()}
    layer = bitsandbytes.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype,
                                       quant_type=state.quant_type, device=packed.device)  # fmt: skip
    layer.weight = bitsandbytes.nn.Params4bit(
        packed.clone(), requires_grad=False, bnb_quantized=True,
        quant_state=bnb_functional.QuantState.from_dict(d, device=packed.device),
    )  # fmt: skip
    layer.eval()
    inference(layer, torch.zeros(1, in_f, dtype=dtype, device=packed.device))
    return layer


def _ours(backend: str, x: torch.Tensor, state) -> Callable:
    """Our op, as users call it (``LF.matmul_4bit``), on one rotated copy (packed, absmax
    codes, nested absmax) under ``backend``."""
    import lowprec_kernels as lpk
    from lowprec_kernels import functional as LF

    states = {}  # id(packed copy) -> its QuantState

    def call(copy):
        packed, absmax, nested_absmax = copy
        st = states.get(id(packed))
        if st is None:
            st = states[id(packed)] = lpk.QuantState.from_dict(
                {**state.as_dict(), "absmax": absmax, "nested_absmax": nested_absmax}
            )
        with lpk.use_backend(backend):
            return LF.matmul_4bit(x, packed, st)

    return call


def _row(bench: Bench, what, shape, dtype, backend, timing, baseline=None, nbytes=None, ops=None,
         compute=None, note=""):  # fmt: skip
    return Row(SUITE, what, shape, _name(dtype), backend, timing, baseline=baseline,
               bytes_moved=nbytes, ops=ops, compute=compute, note=note,
               reads_only=True)  # fmt: skip


def _versus(cand: list[float], base: list[float], floor: list[float] | None) -> Timing:
    return _timing([cand, base, *([floor] if floor else [])], True, floor is not None)


def _alone(samples: list[float]) -> Timing:
    return _timing([samples], False, False)


def rows(bench: Bench) -> list[Row]:
    from lowprec_kernels import functional as LF

    shapes = bench.pick(full=((4096, 4096), (11008, 4096)), quick=((4096, 4096),),
                        smoke=((48, 96),))  # fmt: skip
    row_counts = bench.pick(full=(1, 4, 16, 128, 512), quick=(1, 4, 16, 128), smoke=(1, 5))
    candidates, skipped = bench.candidate_backends()
    for message in skipped:
        bench.note(message)
    bnb = _bitsandbytes()
    if bnb is None:
        bench.note("bitsandbytes is not importable: no bitsandbytes rows")
    bench.note(
        "shape = M x in x out; NF4, blocksize 64, double-quantized absmax (nested blocks of"
        " 256); F.linear runs on our dequantized weights; bitsandbytes is a user's eval-mode"
        " Linear4bit (under no_grad) on a copy of our packed codes, which it repacks for its CPU"
        " kernel at its first call (untimed); on the CPU its fp32 path computes in bf16"
    )
    bench.note(
        "MB = bytes each op must move (ours: packed codes + absmax codes + x + y; F.linear:"
        " its dense weight + x + y); roof = that over the measured read bandwidth, or the"
        " GEMM rate where it binds"
    )
    out: list[Row] = []
    device = bench.device
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device) * in_f**-0.5
        qw, st = LF.quantize_4bit(w, BLOCKSIZE, "nf4", double_quant=True)
        W = {torch.float32: LF.dequantize_4bit(qw, st, torch.float32)}
        W[torch.bfloat16] = W[torch.float32].to(torch.bfloat16)
        del w
        packed_rotation = bench.rotation((qw, st.absmax, st.nested_absmax))
        dense_rotation = {dt: bench.rotation((W[dt],)) for dt in COMPUTE_DTYPES}
        bnb_cycle = None
        if bnb is not None:  # per dtype: a layer per copy of the weight
            try:
                bnb_cycle = {
                    dt: Cycle([_bnb_layer(bnb, copy, st, dt) for copy in packed_rotation.copies])
                    for dt in COMPUTE_DTYPES
                }
            except Exception as err:  # noqa: BLE001 - its CPU kernel takes only some shapes
                bench.note(f"bitsandbytes' Linear4bit refused {out_f} x {in_f}: {err!r}")
        shape = [out_f, in_f]
        for m in row_counts:
            out += _rows_for(bench, m, shape, st, packed_rotation, dense_rotation, bnb_cycle,
                             bnb, candidates)  # fmt: skip
        del packed_rotation, dense_rotation, bnb_cycle, W
    return out


def _rows_for(bench, m, shape, st, packed_rotation, dense_rotation, bnb_cycle, bnb, candidates):
    out_f, in_f = shape
    row_shape = (m, in_f, out_f)
    ops = 2 * m * in_f * out_f
    xs = {dt: torch.randn(m, in_f, device=bench.device).to(dt) for dt in COMPUTE_DTYPES}
    ours = []
    for backend in candidates:
        if not bench.runs_natively("matmul_4bit", backend):
            bench.note(f"backend {backend!r} has no matmul_4bit kernel on {bench.device} (skipped)")
            continue
        for dt in COMPUTE_DTYPES:
            ours.append((("ours", backend, dt), (_ours(backend, xs[dt], st), packed_rotation)))
    # Round A, interleaved: our op (each backend, each dtype), F.linear fp32 and bf16, copy_.
    group = list(ours)
    for dt in COMPUTE_DTYPES:
        linear = (lambda a, x=xs[dt]: F.linear(x, a[0])), dense_rotation[dt]
        group.append((("F.linear", "torch", dt), linear))
    for dt in COMPUTE_DTYPES:  # "vs copy_": a copy of the bytes each dtype's op moves
        group.append((("copy_", "torch", dt), bench.copy_floor(traffic(m, out_f, in_f, dt))))
    samples = _measure_group(bench, group)
    floors = {dt: samples[("copy_", "torch", dt)] for dt in COMPUTE_DTYPES}
    # Round B, interleaved: our op and bitsandbytes. Apart from round A because a bitsandbytes
    # CPU call leaves the next multi-threaded op of the process slow (its OpenMP regions use
    # another team size), which would tax every function measured after it.
    bnb_samples = {}
    if bnb_cycle is not None:
        group = list(ours)
        for dt in COMPUTE_DTYPES:
            call = (lambda layer, x=xs[dt]: inference(layer, x)), bnb_cycle[dt]
            group.append((("bitsandbytes", "bnb", dt), call))
        bnb_samples = _measure_group(bench, group)

    rows = []
    for label, _ in ours:
        _, backend, dt = label
        cand = samples[label]
        nbytes = traffic(m, out_f, in_f, dt)
        what = f"matmul_4bit M={m}"
        vs_linear = _versus(cand, samples[("F.linear", "torch", dt)], floors[dt])
        rows.append(_row(bench, what, row_shape, dt, backend, vs_linear, f"F.linear {_GEMM_KIND[dt]}",
                         nbytes, ops, _GEMM_KIND[dt]))  # fmt: skip
        if dt != torch.float32:
            vs_fp32 = _versus(cand, samples[("F.linear", "torch", torch.float32)], floors[dt])
            rows.append(_row(bench, what, row_shape, dt, backend, vs_fp32, "F.linear fp32",
                             nbytes, ops, _GEMM_KIND[dt]))  # fmt: skip
        if ("bitsandbytes", "bnb", dt) in bnb_samples:
            vs_bnb = _versus(bnb_samples[label], bnb_samples[("bitsandbytes", "bnb", dt)], None)
            rows.append(_row(bench, what, row_shape, dt, backend, vs_bnb, "bnb Linear4bit",
                             nbytes, ops, _GEMM_KIND[dt], note="round B (with bitsandbytes)"))  # fmt: skip
    for dt in COMPUTE_DTYPES:
        dense = out_f * in_f * dt.itemsize + m * (in_f + out_f) * dt.itemsize
        rows.append(_row(bench, f"F.linear M={m}", row_shape, dt, "torch",
                         _alone(samples[("F.linear", "torch", dt)]), None, dense, ops,
                         _GEMM_KIND[dt]))  # fmt: skip
        if ("bitsandbytes", "bnb", dt) in bnb_samples:
            rows.append(_row(bench, f"bnb Linear4bit M={m}", row_shape, dt, "bnb",
                             _alone(bnb_samples[("bitsandbytes", "bnb", dt)]), None,
                             traffic(m, out_f, in_f, dt), ops, _GEMM_KIND[dt]))  # fmt: skip
    return rows


def _measure_group(bench: Bench, group) -> dict:
    """{label: per-call samples} of (label, (fn, rotation)) pairs measured interleaved."""
    labels = [label for label, _ in group]
    return dict(zip(labels, _measure([timed for _, timed in group], bench.settings)))

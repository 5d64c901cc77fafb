"""One quick pass of every op on CUDA with each GPU backend, small and odd shapes.

The optimizer's launches too: AdamW8bit over two 8-bit tensors (one multi-tensor launch)
and one of float32 states (``adam_multi_step_`` where the backend has it, else tensor ops).

Run under ``compute-sanitizer`` by ``benchmarks/gpu_check.sh``: it exercises each kernel's
edge cases (partial blocks, M = 1, odd sizes) so out-of-bounds accesses and races show up.
Exits non-zero when a backend disagrees with the reference.
"""

from __future__ import annotations

import argparse
import sys

import torch

import lowprec_kernels as lpk
from lowprec_kernels import functional as LF
from lowprec_kernels.bench.harness import script_description


def cases(device):
    """(name, callable) pairs; each callable returns tensors to compare across backends."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x_odd = randn(4096 + 17)
    w = randn(67, 130)
    x = randn(3, 130, dtype=torch.float16)
    qw, st = LF.quantize_4bit(w, blocksize=64)
    wq, ws = LF.int8_quantize_weight(w)
    x8 = randn(5, 130) * 3
    yield "quantize_blockwise", lambda: LF.quantize_blockwise(x_odd, blocksize=256)
    q, a = LF.quantize_blockwise(x_odd, blocksize=256)
    yield "dequantize_blockwise", lambda: LF.dequantize_blockwise(q, a, blocksize=256)
    yield "quantize_4bit", lambda: LF.quantize_4bit(w, blocksize=64)[0]
    yield "dequantize_4bit", lambda: LF.dequantize_4bit(qw, st)
    yield "matmul_4bit", lambda: LF.matmul_4bit(x, qw, st)
    x1 = randn(1, 130, dtype=torch.bfloat16)
    yield "matmul_4bit M=1 bf16", lambda: LF.matmul_4bit(x1, qw, st)
    x33 = randn(33, 130)
    yield "matmul_4bit M=33 fp32", lambda: LF.matmul_4bit(x33, qw, st)
    qf, sf = LF.quantize_4bit(w, blocksize=32, quant_type="fp4", double_quant=False)
    yield "quantize_4bit fp4", lambda: LF.quantize_4bit(w, blocksize=32, quant_type="fp4")[0]
    yield "matmul_4bit fp4 M=2", lambda: LF.matmul_4bit(x[:2], qf, sf)
    yield "int8_quantize_weight", lambda: LF.int8_quantize_weight(w)
    yield "int8_vectorwise_quant", lambda: LF.int8_vectorwise_quant(x8, threshold=6.0)
    yield "int8_linear", lambda: LF.int8_linear(x8, wq, ws, threshold=6.0)
    x8_big = randn(67, 130, dtype=torch.float16) * 3
    yield "int8_linear M=67 fp16", lambda: LF.int8_linear(x8_big, wq, ws, threshold=6.0)
    xq, row_stats, _ = LF.int8_vectorwise_quant(x8, threshold=0.0)
    yield "int8_scaled_mm", lambda: LF.int8_scaled_mm(xq, row_stats, wq, ws, dtype=torch.float32)
    p0, g0 = randn(3000 + 5), randn(3000 + 5)
    q1, a1 = LF.quantize_blockwise(randn(3005) * 0.01, LF.dynamic_map(True, device), 256)
    q2, a2 = LF.quantize_blockwise(randn(3005).abs() * 1e-4, LF.dynamic_map(False, device), 256)

    def adam_step():
        state = [p0.clone(), g0, q1.clone(), q2.clone(), a1.clone(), a2.clone()]
        maps = [LF.dynamic_map(True, device), LF.dynamic_map(False, device)]
        counters = [torch.zeros((), device=device), torch.zeros((), device=device)]
        LF.adam8bit_step_(*state, *maps, *counters, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
        return state[0], state[2], state[3], state[4], state[5], counters[0]

    yield "adam8bit_step_", adam_step
    sizes = (4096 + 3, 300, 5000)  # two 8-bit states, one float32 (below min_8bit_size)
    starts = [randn(n) for n in sizes]
    grads = [randn(n) * 1e-2 for n in sizes]

    def adamw8bit_steps():
        params = [torch.nn.Parameter(p.clone()) for p in starts]
        opt = lpk.optim.AdamW8bit(params, lr=1e-3)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params] + [opt.state[p]["state1"] for p in params]

    yield "AdamW8bit multi-tensor", adamw8bit_steps


def close(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(close(x, y) for x, y in zip(a, b))
    if a.dtype.is_floating_point:
        return torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2, equal_nan=True)
    return torch.equal(a, b)


def main() -> int:
    argparse.ArgumentParser(description=script_description(__doc__)).parse_args()
    if not torch.cuda.is_available():
        print("cuda_quick: no CUDA device")
        return 2
    device = "cuda"
    failures = 0
    checked = 0
    for name, fn in cases(device):
        with lpk.use_backend("reference"):
            ref = fn()
        for backend in ("cuda", "triton"):
            if not lpk.available_backends()[backend]:
                continue
            # One broken kernel must not hide the others: report it and go on.
            try:
                with lpk.use_backend(backend):
                    out = fn()
                torch.cuda.synchronize()
                verdict = "ok" if close(out, ref) else "MISMATCH"
            except Exception as exc:  # noqa: BLE001
                verdict = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            failures += verdict != "ok"
            checked += 1
            print(f"{name:24s} {backend:7s} {verdict}")
    if not checked:
        print("cuda_quick: neither the cuda nor the triton backend is available: nothing checked")
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

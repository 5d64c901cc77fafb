"""The Triton GEMMs compiled for sm_90 (H100/H200) with the tiles their launchers pick.

The interpreter that runs the Triton kernels on CPU tensors cannot tell how much shared
memory a tile needs, and accepts code some GPU compilers reject. Both broke the first GPU
run (Triton 3.6): a 3-stage NF4 tile over the limit, and an int8 ``tl.dot`` without
``out_dtype=tl.int32`` (which Triton 3.8, used here, compiles). Compiling needs no GPU, so
CI checks that every tile compiles and fits.
"""

from __future__ import annotations

import pytest
from conftest import run_sm90_compile_script

# Shared memory one block may use on sm_90 (227 KiB). Tiles must stay well under it: another
# Triton version may lay the same tile out larger (3.6 took 14% more than 3.8 for one).
SM90_SHARED_LIMIT = 232448
SHARED_HEADROOM = 0.75

_SCRIPT = r"""
from lowprec_kernels.backends.triton import fourbit, int8

report = {}
int8_signature = dict(
    a_ptr="*i8", stride_am="i32", stride_ak="i32", w_ptr="*i8", stride_wn="i32",
    stride_wk="i32", row_stats_ptr="*fp32", w_scale_ptr="*fp32", bias_ptr="*fp16",
    x_ptr="*fp16", stride_xm="i32", stride_xk="i32", outlier_cols_ptr="*i64",
    n_outliers="i32", out_ptr="*fp16", stride_om="i32", stride_on="i32", M="i32", N="i32",
    K="i32",
)
for m in (1, int8.MEDIUM_M_MAX, 4 * int8.MEDIUM_M_MAX):
    cfg = int8.gemm_config(m)
    constexprs = dict(
        HAS_BIAS=True, HAS_OUTLIERS=True, OUTLIER_DOT_FP32=False, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_OUTLIERS=int8.BLOCK_OUTLIERS,
        GROUP_M=int8.GROUP_M, INT8_SCALE=int8.INT8_SCALE,
    )
    kernel = compile(int8._int8_gemm_kernel, int8_signature, constexprs,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    report[f"int8 M={m}"] = kernel.metadata.shared

for name, dot_dtype, precision in (("fp32", tl.float32, "ieee"), ("bf16", tl.bfloat16, "ieee")):
    signature = dict(
        x_ptr=f"*{name}", w_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8",
        nested_absmax_ptr="*fp32", nested_code_ptr="*fp32", offset_ptr="*fp32",
        bias_ptr=f"*{name}", out_ptr=f"*{name}", M="i32", N="i32", K="i32",
        stride_xm="i32", stride_xk="i32",
    )
    for m in (16, 64, 512):
        block_m, block_n, block_k, num_warps = fourbit._gemm_config(m, 4096, dot_dtype)
        constexprs = dict(
            BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256, HAS_BIAS=True, DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            GROUP_M=fourbit.GEMM_GROUP_M,
        )
        kernel = compile(fourbit._gemm_4bit_kernel, signature, constexprs, num_warps=num_warps,
                         num_stages=fourbit.GEMM_NUM_STAGES, enable_fp_fusion=False)
        report[f"nf4 {name} M={m}"] = kernel.metadata.shared
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def shared_bytes():
    return run_sm90_compile_script(_SCRIPT)


def test_gemm_tiles_compile_for_sm90_within_shared_memory(shared_bytes):
    assert len(shared_bytes) == 9, shared_bytes
    over = {
        tile: size
        for tile, size in shared_bytes.items()
        if size > SHARED_HEADROOM * SM90_SHARED_LIMIT
    }
    assert not over, f"tiles over {SHARED_HEADROOM:.0%} of {SM90_SHARED_LIMIT} B: {over}"

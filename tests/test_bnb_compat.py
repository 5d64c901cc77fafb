"""Cross-check of the reference formats against bitsandbytes (skipped when it is absent).

bitsandbytes' CPU encoder is not exactly nearest (ARCHITECTURE.md §4.1): where its codes
differ from ours, ours must be the nearer (or an equally near) entry, and both decode with
the same table, so its checkpoints load here unchanged.
"""

import pytest
import torch
from conftest import run_on

from lowprec_kernels import functional as LF
from lowprec_kernels.reference.fourbit import unpack_nibbles

bnbF = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_codes_nearest_where_bnb_differs(blocksize):
    x = torch.randn(50_000) * 2
    q, absmax = run_on("reference", LF.quantize_blockwise, x, None, blocksize)
    bq, bst = bnbF.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(bst.code, LF.dynamic_map()), "same dynamic map"
    assert torch.equal(bst.absmax, absmax)
    code = LF.dynamic_map().double()
    v = x.view(-1).double() / absmax.double().repeat_interleave(blocksize)[: x.numel()]
    ours = (code[q.long()] - v).abs()
    theirs = (code[bq.long()] - v).abs()
    differ = q != bq
    assert differ.float().mean() < 0.01, "differences are rare rounding cases"
    assert bool((ours[differ] <= theirs[differ]).all()), "ours is never farther than theirs"
    # Their codes decode identically here: their checkpoints load unchanged.
    ref = bnbF.dequantize_blockwise(bq, bst)
    torch.testing.assert_close(
        run_on("reference", LF.dequantize_blockwise, bq, absmax, None, blocksize), ref
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codes_equal_bnb(quant_type):
    w = torch.randn(96, 320)
    q, st = run_on("reference", LF.quantize_4bit, w, 64, quant_type, False)
    bq, bst = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(bst.absmax, st.absmax)
    a, b = unpack_nibbles(q, w.numel()), unpack_nibbles(bq, w.numel())
    if quant_type == "nf4":
        assert torch.equal(a, b), "NF4 codes equal bit for bit"
    else:
        # FP4 has two zeros (codes 0 and 8); bitsandbytes picks either for tiny values.
        differ = a != b
        assert bool((st.code[a[differ]] == 0).all() and (st.code[b[differ]] == 0).all())

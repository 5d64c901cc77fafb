"""The test harness's output allocation (lowprec_kernels/_alloc.py): poison, and the guard band
that catches a kernel writing past its output's end."""

import pytest
import torch

from lowprec_kernels import _alloc

DTYPES = [torch.float32, torch.bfloat16, torch.uint8, torch.int8, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_are_plain_tensors_filled_with_poison(dtype):
    out = _alloc.empty((3, 5), dtype, "cpu")
    assert out.shape == (3, 5) and out.is_contiguous() and out._base is None
    want = torch.full((3, 5), _alloc.poison(dtype), dtype=dtype)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_write_past_the_end_is_reported_when_the_block_ends(dtype):
    with pytest.raises(AssertionError, match="written past their end"), _alloc.poisoned():
        out = _alloc.empty(7, dtype, "cpu")
        storage = out.untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
        raw[out.numel() * out.element_size()] ^= 1  # the first byte after the output
    with _alloc.poisoned():  # nothing is left over from the failed block
        out = _alloc.empty(7, dtype, "cpu")
        out.fill_(1)


@pytest.mark.whole_storage
def test_outside_poisoning_outputs_fill_their_storage():
    assert _alloc.poison(torch.float32) is None
    out = _alloc.empty((4, 4), torch.float32, "cpu")
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()

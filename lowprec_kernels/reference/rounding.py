"""Unit roundoff per float dtype: the largest relative error of rounding one exact value into
the dtype (2**-p for p significand bits, the implicit one included). Error bounds of the
kernels against the references are written in these units."""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

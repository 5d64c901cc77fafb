"""The Triton backend: one module per kernel family, each registering its kernels.

Kernels register for CUDA tensors and, when ``TRITON_INTERPRET=1`` is set before triton is
imported, for CPU tensors too, so the same kernels are testable on machines without a GPU.
"""

from __future__ import annotations

import torch

from lowprec_kernels._dispatch import mark_available

try:
    import triton  # noqa: F401
except ImportError:
    _TRITON_IMPORTS = False
else:
    _TRITON_IMPORTS = True

if _TRITON_IMPORTS:
    from lowprec_kernels.backends.triton import (  # each import registers its kernels
        adam8bit,  # noqa: F401
        blockwise,  # noqa: F401
        fourbit,  # noqa: F401
        int8,  # noqa: F401
    )
    from lowprec_kernels.backends.triton._utils import interpreter_active

    mark_available("triton", torch.cuda.is_available() or interpreter_active())
else:
    mark_available("triton", False)

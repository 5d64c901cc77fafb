"""Pure-PyTorch definitions of every op: the ``reference`` backend, runnable on any device.

Importing this package registers each function as the ``reference`` kernel of its op.
"""

from lowprec_kernels.reference import adam8bit, blockwise, codebooks, fourbit, int8

__all__ = ["adam8bit", "blockwise", "codebooks", "fourbit", "int8"]

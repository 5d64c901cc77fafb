"""8-bit optimizers: ``Adam8bit`` and ``AdamW8bit`` (bitsandbytes' state layout)."""

from lowprec_kernels.optim import adam8bit as _adam8bit
from lowprec_kernels.optim.adam8bit import Adam8bit, AdamW8bit

# help(lowprec_kernels.optim) shows the module's whole story: the state layout, how skipped
# steps are counted, and which parameters should keep float32 states.
__doc__ = _adam8bit.__doc__

__all__ = ["Adam8bit", "AdamW8bit"]

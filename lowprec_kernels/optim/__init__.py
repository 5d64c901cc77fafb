"""8-bit optimizers: ``Adam8bit`` and ``AdamW8bit`` (bitsandbytes' state layout)."""

from lowprec_kernels.optim.adam8bit import Adam8bit, AdamW8bit

__all__ = ["Adam8bit", "AdamW8bit"]

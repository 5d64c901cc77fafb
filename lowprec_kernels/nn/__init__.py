"""Drop-in quantized layers: ``Linear4bit`` (NF4/FP4, QLoRA) and ``Linear8bitLt`` (LLM.int8)."""

from lowprec_kernels.nn.linear4bit import Linear4bit, Params4bit
from lowprec_kernels.nn.linear8bit import Linear8bitLt
from lowprec_kernels.nn.quantize import quantize_model

__all__ = ["Linear4bit", "Linear8bitLt", "Params4bit", "quantize_model"]

"""qlora_fast: fused NF4 + LoRA Triton kernels for peft + bitsandbytes QLoRA training."""

from .ops.dequantize import dequantize_nf4
from .patch import PatchReport, is_patched, patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = ["dequantize_nf4", "patch_model", "unpatch_model", "is_patched", "PatchReport", "__version__"]

"""qlora_fast: fused NF4 + LoRA Triton kernels for peft + bitsandbytes QLoRA training."""

import os

import torch

# Without a GPU, Triton can only run kernels through its CPU interpreter; it reads this switch when
# the kernels are defined, so it is set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .ops.dequantize import dequantize_nf4
from .patch import PatchReport, is_patched, patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = ["dequantize_nf4", "patch_model", "unpatch_model", "is_patched", "PatchReport", "__version__"]

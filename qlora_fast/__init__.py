"""qlora_fast: fused NF4 + LoRA Triton kernels for peft + bitsandbytes QLoRA training."""

import os
import sys
import warnings

import torch

# Without a GPU, Triton can only run kernels through its CPU interpreter; it reads this switch when
# the kernels are defined (its own library functions included), so it is set before they are imported.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        warnings.warn("qlora_fast: triton was imported before qlora_fast on a machine without a GPU, so its "
                      "CPU interpreter cannot run the kernels; import qlora_fast first, or set "
                      "TRITON_INTERPRET=1 before importing triton (or bitsandbytes, which imports it)",
                      stacklevel=2)
    os.environ["TRITON_INTERPRET"] = "1"

from .ops.dequantize import dequantize_nf4
from .patch import PatchReport, is_patched, patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = ["dequantize_nf4", "patch_model", "unpatch_model", "is_patched", "PatchReport", "__version__"]

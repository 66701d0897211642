"""qlora_fast: fused NF4 + LoRA Triton kernels for peft + bitsandbytes QLoRA training."""

import logging
import os
import sys

import torch


class _DropMessages(logging.Filter):
    """Drops third-party log lines that say nothing a user can act on."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# bitsandbytes logs this when it is imported on a CPU with AVX512-BF16 and without the optional `kernels`
# package; its own CPU path works without it. Set before this package's modules import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))


def _reimport_triton() -> None:
    """Imports triton again, interpreted, and points the modules already loaded (TRL's and bitsandbytes'
    kernels, say) at it: each module-level kernel is defined anew through the interpreted triton.jit and
    each `triton` / `tl` global names the new modules. Triton's compiled extension stays loaded."""
    old = {name: module for name, module in sys.modules.items()
           if (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")}
    old_jit = old["triton"].runtime.jit.JITFunction
    old_tuners = tuple(getattr(old.get("triton.runtime.autotuner"), n, ()) for n in ("Autotuner", "Heuristics"))
    for name in old:
        del sys.modules[name]
    import triton

    import triton.language  # noqa: F401  (for the `tl` globals below)

    renamed = {id(module): name for name, module in old.items()}
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] in ("triton", "torch"):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in renamed and renamed[id(value)] in sys.modules:
                setattr(module, attr, sys.modules[renamed[id(value)]])
            elif isinstance(value, old_jit):
                setattr(module, attr, triton.jit(value.fn))
            elif old_tuners and isinstance(value, old_tuners) and isinstance(value.fn, old_jit):
                value.fn = triton.jit(value.fn.fn)


# Without a GPU, Triton can only run kernels through its CPU interpreter; it reads this switch when
# kernels are defined, its own library functions included. Scripts usually import transformers, peft or
# bitsandbytes (which import triton) first: triton is then imported again, interpreted.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        _reimport_triton()

from .ops.dequantize import dequantize_nf4
from .patch import PatchReport, is_patched, patch_model, unpatch_model
from .harness.verify import verify

__version__ = "0.1.0"
__all__ = ["dequantize_nf4", "patch_model", "unpatch_model", "is_patched", "PatchReport", "verify", "__version__"]

"""patch_model's `fused_mlp`: each SwiGLU MLP whose three projections it serves as one Function."""

import torch

from ..ops.lora_nf4_mlp import lora_nf4_mlp
from ..ops.offloaded_checkpoint import recomputing
from .architectures import has
from .core import CALLS, OUTPUT_ONLY_TO_RESIDUAL, has_hooks, is_patched, previous_forward
from .projections import compute_dtype, fusable, fused_group


_SILU = {"SiLUActivation", "SiLU"}
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def fusable_mlps(model: torch.nn.Module):
    """SwiGLU MLPs whose three projections are patchable LoRA NF4 layers without base bias."""
    return [m for m in model.modules()
            if has(m, "swiglu_mlp") and type(getattr(m, "act_fn", None)).__name__ in _SILU
            and all(fusable(getattr(m, p, None)) for p in _MLP_PROJECTIONS)]


@torch.compiler.disable
def mlp_forward(self, x):
    """The whole SwiGLU MLP in one Function when its three projections can take the fused path with the
    same adapter and no dropout, and one rank (the SwiGLU kernels add their terms with one); otherwise
    the stock MLP forward (each projection then decides alone)."""
    projections = [self._modules[p] for p in _MLP_PROJECTIONS]
    found = fused_group(projections, uncalled=projections)
    if found is None or len({f.lora_a.shape[0] for f in found}) != 1:
        return previous_forward(self)(x)
    output_needed = not (recomputing() and vars(self).get(OUTPUT_ONLY_TO_RESIDUAL, False))
    CALLS["mlp"] += 1
    return lora_nf4_mlp(x, *(f[1:] for f in found), compute_dtype=compute_dtype(projections[0], x),
                        output_needed=output_needed)


def mark_residual_mlps(model: torch.nn.Module) -> None:
    """Flags fused MLPs whose layer (hook-free: a hook could read the output) just adds their output."""
    for layer in model.modules():
        mlp = layer._modules.get("mlp")
        if has(layer, "llama_layer") and is_patched(mlp) and not has_hooks(layer):
            vars(mlp)[OUTPUT_ONLY_TO_RESIDUAL] = True

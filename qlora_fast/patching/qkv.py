"""patch_model's `fused_qkv`: an attention's q, k and v projections as one Function."""

import torch

from ..kernels.nf4_dequantize import stackable
from ..ops.lora_nf4_qkv import lora_nf4_qkv
from .architectures import has
from .core import CALLS, KEEP_OUTPUT, STASHED
from .projections import compute_dtype, fusable, fused_group


QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def fusable_qkv(model: torch.nn.Module):
    """Attentions whose q, k and v projections are patchable LoRA NF4 layers, with frozen base biases
    (Qwen2) or none."""
    return [m for m in model.modules() if has(m, "qkv_attention")
            and all(fusable(getattr(m, p, None), frozen_bias_ok=True) for p in QKV_PROJECTIONS)
            and len({getattr(m, p).base_layer.bias is None for p in QKV_PROJECTIONS}) == 1]


def fused_qkv_forward(q_proj, siblings, x):
    """q_proj's output from one Function over the three projections, k's and v's left on their modules
    for their own calls on this same x; None where the three cannot take it now (then each goes alone)."""
    projections = (q_proj, *siblings)
    found = fused_group(projections, uncalled=siblings)
    if (found is None or len({compute_dtype(p, x) for p in projections}) != 1
            or not stackable([f.weight for f in found])):
        return None
    biases = [p._modules["base_layer"].bias for p in projections]
    biases = None if biases[0] is None else biases  # all or none: fusable_qkv
    CALLS["qkv"] += 1
    q, k, v = lora_nf4_qkv(x, *(f[1:] for f in found), compute_dtype=compute_dtype(q_proj, x), biases=biases,
                           keep_output=vars(q_proj).get(KEEP_OUTPUT, False))
    for projection, output in zip(siblings, (k, v)):
        vars(projection)[STASHED] = (x, output)
    return q

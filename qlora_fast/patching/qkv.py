"""patch_model's `fused_qkv`: an attention's q, k and v projections as one Function."""

import torch

from ..kernels.nf4_dequantize import stackable
from ..ops.adapters import wider
from ..ops.lora_nf4_qkv import lora_nf4_qkv
from .architectures import has
from .core import ATTENTION_INPUTS, CALLS, KEEP_OUTPUT, KV_SIBLINGS, STASHED, has_hooks, is_patched, stock_dtype
from .projections import compute_dtype, fusable, fused_group


QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def fusable_qkv(model: torch.nn.Module):
    """Attentions whose q, k and v projections are patchable LoRA NF4 layers, with frozen base biases
    (Qwen2) or none."""
    return [m for m in model.modules() if has(m, "qkv_attention")
            and all(fusable(getattr(m, p, None), frozen_bias_ok=True) for p in QKV_PROJECTIONS)
            and len({getattr(m, p).base_layer.bias is None for p in QKV_PROJECTIONS}) == 1]


def qkv_group(q_proj, siblings, x) -> list | None:
    """The three projections' Projections when one Function can serve them now (one compute dtype for x,
    stackable weights), else None."""
    projections = (q_proj, *siblings)
    found = fused_group(projections, uncalled=siblings)
    if (found is None or len({compute_dtype(p, x) for p in projections}) != 1
            or not stackable([f.weight for f in found])):
        return None
    return found


def rounds_its_input(attention, x) -> bool:
    """Whether this attention's only use of its hidden-states input is the fused q/k/v Function now, which
    first rounds it to the compute dtype (so it may be handed on in that dtype)."""
    q_proj = attention._modules.get("q_proj")
    siblings = None if q_proj is None else vars(q_proj).get(KV_SIBLINGS)
    if siblings is None or has_hooks(attention) or has_hooks(q_proj) or not is_patched(q_proj):
        return False
    return qkv_group(q_proj, siblings, x) is not None


def fused_qkv_forward(q_proj, siblings, x):
    """q_proj's output from one Function over the three projections, k's and v's left on their modules
    for their own calls on this same x; None where the three cannot take it now (then each goes alone)."""
    found = qkv_group(q_proj, siblings, x)
    if found is None:
        return None
    biases = [p._modules["base_layer"].bias for p in (q_proj, *siblings)]
    biases = None if biases[0] is None else biases  # all or none: fusable_qkv
    CALLS["qkv"] += 1
    out_dtype, rounded_to = stock_dtype(x), ATTENTION_INPUTS.rounded_to  # v goes to the attention alone
    v_dtype = rounded_to if rounded_to is not None and wider(out_dtype, rounded_to) else None
    q, k, v = lora_nf4_qkv(x, *(f[1:] for f in found), compute_dtype=compute_dtype(q_proj, x), biases=biases,
                           keep_output=vars(q_proj).get(KEEP_OUTPUT, False), out_dtype=out_dtype, v_dtype=v_dtype)
    for projection, output in zip(siblings, (k, v)):
        vars(projection)[STASHED] = (x, output)
    return q

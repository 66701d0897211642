"""patch_model's `fused_qkv`: an attention's q, k and v projections as one Function."""

import torch

from ..kernels.nf4_dequantize import stackable
from ..ops.adapters import wider
from ..ops.lora_nf4_qkv import Rotary, lora_nf4_qkv
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


def _rotary(found, x, q_dtype: torch.dtype, attention_dtype: torch.dtype | None) -> Rotary | None:
    """The decoder layer's offer of its cos and sin (core.ATTENTION_INPUTS) where the RoPE kernel computes
    exactly what the attention's apply_rotary_pos_emb would on these q and k: torch would not promote (cos
    in q's dtype), heads a power of two wide (at least 32: the term's product takes half a head), one rank
    for q's and k's adapters, positions of x's batch and length."""
    offered = ATTENTION_INPUTS.rotary
    if offered is None or x.dim() != 3:
        return None
    cos, sin = offered
    head_dim = cos.shape[-1]
    if not (cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride()
            and cos.dtype == sin.dtype == q_dtype and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[1]
            and head_dim >= 32 and head_dim & (head_dim - 1) == 0 and cos.device == x.device
            and not (cos.requires_grad or sin.requires_grad) and found[0].lora_a.shape[0] == found[1].lora_a.shape[0]
            and all(f.weight.shape[0] % head_dim == 0 for f in found[:2])):
        return None
    narrower = attention_dtype is not None and wider(q_dtype, attention_dtype)
    return Rotary(cos, sin, attention_dtype if narrower else q_dtype)


def fused_qkv_forward(q_proj, siblings, x):
    """q_proj's output from one Function over the three projections, k's and v's left on their modules
    for their own calls on this same x; None where the three cannot take it now (then each goes alone).
    q and k come out rotated where the decoder layer offers its RoPE (then the drop-in passes them)."""
    found = qkv_group(q_proj, siblings, x)
    if found is None:
        return None
    biases = [p._modules["base_layer"].bias for p in (q_proj, *siblings)]
    biases = None if biases[0] is None else biases  # all or none: fusable_qkv
    CALLS["qkv"] += 1
    out_dtype, rounded_to = stock_dtype(x), ATTENTION_INPUTS.rounded_to  # v goes to the attention alone
    v_dtype = rounded_to if rounded_to is not None and wider(out_dtype, rounded_to) else None
    rotary = _rotary(found, x, out_dtype, rounded_to)
    q, k, v = lora_nf4_qkv(x, *(f[1:] for f in found), compute_dtype=compute_dtype(q_proj, x), biases=biases,
                           keep_output=vars(q_proj).get(KEEP_OUTPUT, False), out_dtype=out_dtype, v_dtype=v_dtype,
                           rotary=rotary)
    if rotary is not None:
        CALLS["rope"] += 1
        ATTENTION_INPUTS.rotated = (q, k)
    for projection, output in zip(siblings, (k, v)):
        vars(projection)[STASHED] = (x, output)
    return q

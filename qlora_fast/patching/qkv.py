"""patch_model's `fused_qkv`: an attention's q, k and v projections as one Function: Llama-style q_proj,
k_proj and v_proj, or Phi-3's qkv_proj as its q, k and v row blocks."""

import sys

import torch

from ..kernels.nf4_dequantize import stackable
from ..nf4 import cached_nf4_weight
from ..ops.adapters import wider
from ..ops.lora_nf4_qkv import Rotary, lora_nf4_qkv
from .architectures import has
from .core import (ATTENTION_INPUTS, CALLS, KEEP_OUTPUT, KV_SIBLINGS, STASHED, called_forward, has_hooks,
                   is_patched, previous_forward, stock_dtype, widened)
from .projections import compute_dtype, fusable, fused_group, nf4_row_blocks, row_blocks
from .rotary import rotates_through_drop_in


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
    if called_forward(attention) is qkv_proj_attention_forward:
        return not has_hooks(attention) and _qkv_proj_terms(attention, x) is not None
    q_proj = attention._modules.get("q_proj")
    siblings = None if q_proj is None else vars(q_proj).get(KV_SIBLINGS)
    if siblings is None or has_hooks(attention) or has_hooks(q_proj) or not is_patched(q_proj):
        return False
    return qkv_group(q_proj, siblings, x) is not None


def _rotary(terms, x, q_dtype: torch.dtype, attention_dtype: torch.dtype | None, offered,
            head_dim: int | None = None) -> Rotary | None:
    """The offered (cos, sin) as the fused Function's rotary, where the RoPE kernel computes exactly what
    the attention's apply_rotary_pos_emb would on these q and k: torch would not promote (cos in q's
    dtype), whole heads rotated (`head_dim`, where known, is cos's width), heads at least 32 wide (the
    term's product takes half a head), one rank for q's and k's adapters (terms: (lora_a, lora_b,
    scaling, weight) each), positions of x's batch and length."""
    if offered is None or x.dim() != 3:
        return None
    cos, sin = offered
    width = cos.shape[-1]
    if not (cos.dim() == 3 and cos.shape == sin.shape and cos.stride() == sin.stride()
            and cos.dtype == sin.dtype == q_dtype and cos.shape[0] in (1, x.shape[0]) and cos.shape[1] == x.shape[1]
            and width >= 32 and width % 2 == 0 and head_dim in (None, width) and cos.device == x.device
            and not (cos.requires_grad or sin.requires_grad) and terms[0][0].shape[0] == terms[1][0].shape[0]
            and all(t[3].shape[0] % width == 0 for t in terms[:2])):
        return None
    narrower = attention_dtype is not None and wider(q_dtype, attention_dtype)
    return Rotary(cos, sin, attention_dtype if narrower else q_dtype)


def _v_dtype(out_dtype: torch.dtype) -> torch.dtype | None:
    """v's dtype where the attention function rounds it narrower than q's and k's (core.ATTENTION_INPUTS)."""
    rounded_to = ATTENTION_INPUTS.rounded_to
    return rounded_to if rounded_to is not None and wider(out_dtype, rounded_to) else None


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
    out_dtype, terms = stock_dtype(x), [f[1:] for f in found]  # v goes to the attention alone
    rotary = _rotary(terms, x, out_dtype, ATTENTION_INPUTS.rounded_to, ATTENTION_INPUTS.rotary)
    q, k, v = lora_nf4_qkv(x, *terms, compute_dtype=compute_dtype(q_proj, x), biases=biases,
                           keep_output=vars(q_proj).get(KEEP_OUTPUT, False), out_dtype=out_dtype,
                           v_dtype=_v_dtype(out_dtype), rotary=rotary)
    if rotary is not None:
        CALLS["rope"] += 1
        ATTENTION_INPUTS.rotated = (q, k)
    for projection, output in zip(siblings, (k, v)):
        vars(projection)[STASHED] = (x, output)
    return q


def _qkv_widths(attention) -> list:
    """The q, k and v row blocks' heights in Phi-3's qkv_proj: whole heads of q, then of k, then of v."""
    kv_width = attention.num_key_value_heads * attention.head_dim
    return [attention.config.num_attention_heads * attention.head_dim, kv_width, kv_width]


def _splits_on_blocks(attention) -> bool:
    """Whether qkv_proj's NF4 weight has q, k and v row blocks that dequantize on their own (each starts on
    a block of scales). Phi-3's do; a model whose rows do not keeps stock's forward and slicing."""
    weight = cached_nf4_weight(attention._modules["qkv_proj"].base_layer.weight)
    return weight is not None and nf4_row_blocks(weight, _qkv_widths(attention)) is not None


def fusable_qkv_proj(model: torch.nn.Module):
    """Attentions that project q, k and v with one qkv_proj (Phi-3's) whose layer is a patchable LoRA NF4
    one without base bias, split into row blocks on blocks of scales."""
    return [m for m in model.modules() if has(m, "qkv_proj_attention") and fusable(m._modules.get("qkv_proj"))
            and _splits_on_blocks(m)]


def _qkv_proj_terms(attention, x) -> list | None:
    """qkv_proj's q, k and v row blocks for the fused Function, where it can serve them now (no hooks on
    qkv_proj, whose call it replaces)."""
    layer = attention._modules["qkv_proj"]
    found = fused_group([layer], uncalled=[layer])
    if found is None:
        return None
    blocks = row_blocks(layer, found[0], _qkv_widths(attention))
    return blocks if blocks is not None and stackable([b[3] for b in blocks]) else None


@torch.compiler.disable
def qkv_proj_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                               **kwargs):
    """Phi-3's attention forward with q, k and v from the fused q/k/v Function over qkv_proj's row blocks,
    as three outputs: backward gathers their gradients in one pass, where slicing one output sums three
    zero-padded copies of it. The rest is the stock forward's, step for step; where the Function cannot
    serve the projection now, the stock forward."""
    terms = _qkv_proj_terms(self, hidden_states)
    if terms is None:
        return previous_forward(self)(widened(hidden_states), position_embeddings, attention_mask,
                                      past_key_values=past_key_values, **kwargs)
    CALLS["qkv"] += 1
    layer, module = self._modules["qkv_proj"], sys.modules[type(self).__module__]
    out_dtype = stock_dtype(hidden_states)
    # q and k rotated inside the Function where the drop-in would rotate them (patching/rotary.py)
    rotary = _rotary(terms, hidden_states, out_dtype, ATTENTION_INPUTS.rounded_to,
                     position_embeddings if rotates_through_drop_in(self) else None, self.head_dim)
    q, k, v = lora_nf4_qkv(hidden_states, *terms, compute_dtype=compute_dtype(layer, hidden_states),
                           keep_output=vars(layer).get(KEEP_OUTPUT, False), out_dtype=out_dtype,
                           v_dtype=_v_dtype(out_dtype), rotary=rotary)
    lead = hidden_states.shape[:-1]
    q, k, v = (t.view(*lead, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
    if rotary is not None:
        CALLS["rope"] += 1
    else:
        q, k = module.apply_rotary_pos_emb(q, k, *position_embeddings)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention = module.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                             module.eager_attention_forward)
    dropout = self.attention_dropout if self.training else 0.0
    out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling,
                             sliding_window=getattr(self.config, "sliding_window", None), **kwargs)
    return self._modules["o_proj"](out.reshape(*lead, -1).contiguous()), weights

"""patch_model's `rms_norm` and `add_norm`: frozen Llama- and Gemma-style RMSNorms on the kernel, and the
residual adds of Llama-style decoder layers inside the norm after each."""

import torch

from ..kernels.rms_norm import norm_dtype
from ..ops.adapters import wider
from ..ops.offloaded_checkpoint import recomputing
from ..ops.rms_norm import add_rms_norm, rms_norm as rms_norm_op
from ..ops.unread_sum import unread_sum
from .architectures import has
from .core import (ATTENTION_INPUTS, CALLS, NARROWED_FROM, OUTPUT_UNREAD_IN_RECOMPUTE, has_hooks, is_patched,
                   previous_forward)
from .mlp import mlp_plus_residual, rounds_its_input as mlp_rounds_its_input
from .attention import IMPLEMENTATION as OUR_IMPLEMENTATION
from .qkv import rounds_its_input as attention_rounds_its_input
from .rotary import rotates_through_drop_in


def _frozen_norm(norm, x, eps: float, offset_weight: bool):
    if norm.weight.requires_grad:  # unfrozen after patching: the kernel gives no weight gradient
        return previous_forward(norm)(x)
    CALLS["rms_norm"] += 1
    return rms_norm_op(x, norm.weight, eps, offset_weight)


@torch.compiler.disable
def rms_norm_forward(self, x):
    return _frozen_norm(self, x, self.variance_epsilon, offset_weight=False)


@torch.compiler.disable
def gemma_rms_norm_forward(self, x):
    return _frozen_norm(self, x, self.eps, offset_weight=True)


def frozen_norms(model: torch.nn.Module):
    """(norm, its patched forward) for each frozen RMSNorm the kernel computes: Llama's or Gemma's."""
    found = []
    for m in model.modules():
        forward = (rms_norm_forward if has(m, "llama_norm") else gemma_rms_norm_forward if has(m, "gemma_norm")
                   else None)
        if forward is not None and not m.weight.requires_grad:
            found.append((m, forward))
    return found


_RESIDUAL_DROPOUTS = ("resid_attn_dropout", "resid_mlp_dropout")  # Phi-3's, each before its residual add


def _drops_nothing(layer) -> bool:
    """Whether the layer's residual dropouts (Phi-3's; Llama's layer has none) pass their inputs through
    now (p = 0, or eval mode) with no hooks that would see them, so the layer may skip calling them."""
    dropouts = [layer._modules.get(name) for name in _RESIDUAL_DROPOUTS]
    return all(d is None or ((d.p == 0 or not d.training) and not has_hooks(d)) for d in dropouts)


def add_norm_layers(model: torch.nn.Module):
    """Llama-style decoder layers whose two norms are Llama's on the kernel (patched, hook-free; Gemma's
    layer is Llama's, its norms are not) and whose residual dropouts drop nothing, in transformers 5
    (whose layer forward add_norm_layer_forward reproduces: past_key_values, a tensor returned)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return []
    return [m for m in model.modules()
            if has(m, "llama_layer") and _drops_nothing(m)
            and all(is_patched(n) and has(n, "llama_norm") and not has_hooks(n)
                    for n in (m._modules.get("input_layernorm"), m._modules.get("post_attention_layernorm")))]


def _add_norm_for(residual, delta, norm, consumer_rounds_it):
    """add_rms_norm(residual, delta) with `norm`'s weight, its normalized output written in autocast's dtype
    where stock's is wider and its consumer (the fused q/k/v or MLP Function) rounds it to that dtype before
    any use (`consumer_rounds_it()`, asked only then), which makes the narrowing exact; such an output
    carries its stock dtype (core.NARROWED_FROM) so that the consumer returns what stock returns. Spares the
    wide write and the consumer's cast pass on a model `prepare_model_for_kbit_training` upcast (fp32
    residual stream and norms, bf16 compute)."""
    weight = norm._parameters["weight"]
    wide = norm_dtype(residual.dtype if delta is None else torch.promote_types(residual.dtype, delta.dtype),
                      weight.dtype)
    device_type = residual.device.type
    narrow = None
    if (torch.is_autocast_enabled(device_type) and wider(wide, torch.get_autocast_dtype(device_type))
            and consumer_rounds_it()):
        narrow = torch.get_autocast_dtype(device_type)
    residual, hidden = add_rms_norm(residual, delta, weight, norm.variance_epsilon, out_dtype=narrow)
    if narrow is not None:
        setattr(hidden, NARROWED_FROM, wide)
    return residual, hidden


# Attention functions that, under autocast, round q, k and v to autocast's dtype before any use of them
# (sdpa and flash attention cast them; ours does as sdpa; eager's matmul casts them, and only
# its dropout would see the difference)
_ROUNDING_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", OUR_IMPLEMENTATION)


def _attention_rounding(attention, past_key_values, device_type: str) -> torch.dtype | None:
    """Autocast's dtype where this hook-free attention hands q, k and v (after RoPE) to nothing but an
    attention function that rounds them to it first, so they may be written in it (core.ATTENTION_INPUTS):
    no KV cache (it would store them), no hooks (output capture reads attention weights)."""
    if not torch.is_autocast_enabled(device_type) or past_key_values is not None or has_hooks(attention):
        return None
    implementation = getattr(attention.config, "_attn_implementation", None)
    dropout = attention.training and getattr(attention, "attention_dropout", 0.0)
    if implementation in _ROUNDING_ATTENTION or (implementation == "eager" and not dropout):
        return torch.get_autocast_dtype(device_type)
    return None


def _rotary_offer(attention, position_embeddings) -> tuple | None:
    """(cos, sin) for the fused q/k/v to rotate q and k with, where this attention hands its projections'
    outputs straight to the RoPE drop-in (core.ATTENTION_INPUTS), with no hook on it or on q_proj and
    k_proj that could see or replace them on the way."""
    watched = [attention, *(m for m in map(attention._modules.get, ("q_proj", "k_proj")) if m is not None)]
    if (not has(attention, "rotary_projections") or not rotates_through_drop_in(attention)
            or any(has_hooks(m) for m in watched)
            or not isinstance(position_embeddings, tuple) or len(position_embeddings) != 2):
        return None
    return position_embeddings


@torch.compiler.disable
def add_norm_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                            use_cache=False, position_embeddings=None, **kwargs):
    """The stock decoder layer's forward, each norm taking the residual add before it (and the sum of
    the gradients after it) into its kernel. In a recompute the layer's output is not computed."""
    first, second = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
    # norms unfrozen, or dropouts set to drop, after patching
    if first.weight.requires_grad or second.weight.requires_grad or not _drops_nothing(self):
        return previous_forward(self)(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)
    CALLS["rms_norm"] += 2
    attention, mlp = self._modules["self_attn"], self._modules["mlp"]
    residual, hidden = _add_norm_for(hidden_states, None, first,
                                     lambda: attention_rounds_its_input(attention, hidden_states))
    ATTENTION_INPUTS.rounded_to = _attention_rounding(attention, past_key_values, hidden_states.device.type)
    ATTENTION_INPUTS.rotary = _rotary_offer(attention, position_embeddings)
    try:
        hidden, _ = attention(hidden_states=hidden, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        if ATTENTION_INPUTS.rotated is not None:
            raise RuntimeError(f"qlora_fast: {type(attention).__name__} did not apply RoPE to the q and k the fused "
                               "q/k/v had rotated; patch the model with rope=False (and report the model class)")
    finally:
        ATTENTION_INPUTS.rounded_to = ATTENTION_INPUTS.rotary = ATTENTION_INPUTS.rotated = None
    residual, hidden = _add_norm_for(residual, hidden, second, lambda: mlp_rounds_its_input(mlp))
    unread = recomputing() and vars(self)[OUTPUT_UNREAD_IN_RECOMPUTE]
    summed = None if unread else mlp_plus_residual(mlp, hidden, residual)
    if summed is not None:
        return summed
    hidden = mlp(hidden)
    if unread and hidden.shape == residual.shape:
        return unread_sum(residual, hidden)
    return residual + hidden

"""patch_model's `rms_norm` and `add_norm`: frozen Llama- and Gemma-style RMSNorms on the kernel, and the
residual adds of Llama-style decoder layers inside the norm after each."""

import torch

from ..ops.offloaded_checkpoint import recomputing
from ..ops.rms_norm import add_rms_norm, rms_norm as rms_norm_op
from ..ops.unread_sum import unread_sum
from .architectures import has
from .core import CALLS, OUTPUT_UNREAD_IN_RECOMPUTE, has_hooks, is_patched, previous_forward


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


def add_norm_layers(model: torch.nn.Module):
    """Llama-style decoder layers whose two norms are Llama's on the kernel (patched, hook-free; Gemma's
    layer is Llama's, its norms are not), in transformers 5
    (whose layer forward add_norm_layer_forward reproduces: past_key_values, a tensor returned)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return []
    return [m for m in model.modules()
            if has(m, "llama_layer")
            and all(is_patched(n) and has(n, "llama_norm") and not has_hooks(n)
                    for n in (m._modules.get("input_layernorm"), m._modules.get("post_attention_layernorm")))]


@torch.compiler.disable
def add_norm_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                            use_cache=False, position_embeddings=None, **kwargs):
    """The stock decoder layer's forward, each norm taking the residual add before it (and the sum of
    the gradients after it) into its kernel. In a recompute the layer's output is not computed."""
    first, second = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
    if first.weight.requires_grad or second.weight.requires_grad:  # unfrozen after patching
        return previous_forward(self)(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)
    CALLS["rms_norm"] += 2
    residual, hidden = add_rms_norm(hidden_states, None, first._parameters["weight"], first.variance_epsilon)
    hidden, _ = self.self_attn(hidden_states=hidden, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache,
                               position_embeddings=position_embeddings, **kwargs)
    residual, hidden = add_rms_norm(residual, hidden, second._parameters["weight"], second.variance_epsilon)
    hidden = self.mlp(hidden)
    if recomputing() and vars(self)[OUTPUT_UNREAD_IN_RECOMPUTE] and hidden.shape == residual.shape:
        return unread_sum(residual, hidden)
    return residual + hidden

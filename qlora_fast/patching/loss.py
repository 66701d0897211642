"""patch_model's `chunked_loss`: a training forward's loss from the last hidden states, no full logits."""

import torch

from ..ops.linear_cross_entropy import causal_lm_loss, in_head_dtype
from ..ops.offloaded_checkpoint import prefetch_last_layer
from .architectures import class_names
from .core import CALLS, has_hooks, is_patched, previous_forward
from .trl_head import answer_fused_head_call


def causal_lm(model: torch.nn.Module):
    """The transformers *ForCausalLM module inside `model` whose loss can be chunked, or None."""
    for m in model.modules():
        head = m._modules.get("lm_head")  # own children only: peft wrappers forward attribute lookups
        if type(m).__name__ in class_names("plain_head") and type(head) is torch.nn.Linear and "model" in m._modules:
            return m
    return None


def unchunked_causal_lm(model: torch.nn.Module) -> str | None:
    """The class name of a causal LM whose loss keeps the stock path (not known to be a plain head)."""
    for m in model.modules():
        if "lm_head" in m._modules and type(m).__name__ not in class_names("plain_head"):
            return type(m).__name__
    return None


def forward_with_chunked_loss(self, *args, labels=None, **kwargs):
    """Training forward with labels: the loss from the hidden states, chunk by chunk, and no logits
    (outputs.logits is None); TRL's fused-head calls answered with its outputs where trl_head serves them.
    Evaluation, generation, other fused-head calls and an lm_head with hooks (FSDP's, which gather its
    weight only when it is called) take the stock forward."""
    if not is_patched(self):  # unpatched, inside the fused head TRL installed over it
        return previous_forward(self)(*args, labels=labels, **kwargs)
    answer = answer_fused_head_call(self, previous_forward(self), args, labels, kwargs)
    if answer is not None:
        return answer
    if (labels is None or args or not self.training or kwargs.get("fused_lm_head")
            or kwargs.get("return_dict") is False or has_hooks(self.lm_head)):
        return previous_forward(self)(*args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    CALLS["loss"] += 1
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(**kwargs)
    prefetch_last_layer()  # the backward's first need, copied while the head computes
    hidden, weight = in_head_dtype(outputs.last_hidden_state, self.lm_head.weight)
    loss = causal_lm_loss(hidden, weight, labels, num_items_in_batch,
                          softcap=getattr(self.config, "final_logit_softcapping", None))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


forward_with_chunked_loss.passes_through_when_unpatched = True  # see core.restore_forward

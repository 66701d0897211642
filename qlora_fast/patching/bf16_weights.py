"""patch_model's `bf16_frozen_weights`: frozen fp32 embedding and head weights that hold only bf16
values, held in bf16."""

import torch

from .architectures import has
from .core import is_patched, previous_forward, replace_forward
from .loss import causal_lm


_HELD_DTYPE = "_qlora_fast_held_dtype"  # on a weight hold_in_bf16 narrowed: the dtype it had


def _servable(module) -> bool:
    """A plain Embedding or Linear without bias, or Gemma's scaled Embedding: a forward _held_forward has."""
    return ((type(module) in (torch.nn.Embedding, torch.nn.Linear) or has(module, "scaled_embedding"))
            and getattr(module, "bias", None) is None)


def _bf16_exact(weight) -> bool:
    """A frozen fp32 weight that holds only bf16 values (what prepare_model_for_kbit_training makes of a
    bf16 checkpoint's embeddings and head)."""
    return (type(weight) is torch.nn.Parameter and weight.dtype == torch.float32 and not weight.requires_grad
            and bool(torch.equal(weight, weight.to(torch.bfloat16).float())))


@torch.compiler.disable
def _embedding_of_held_weight(self, input_ids):
    return previous_forward(self)(input_ids).to(vars(self.weight)[_HELD_DTYPE])


@torch.compiler.disable
def _scaled_embedding_of_held_weight(self, input_ids):
    """Gemma's rows * embed_scale, both in the weight's former dtype, as stock computes them from it."""
    dtype = vars(self.weight)[_HELD_DTYPE]
    return torch.nn.Embedding.forward(self, input_ids).to(dtype) * self.embed_scale.to(dtype)


def _held_forward(module):
    if has(module, "scaled_embedding"):
        return _scaled_embedding_of_held_weight
    return _embedding_of_held_weight if type(module) is torch.nn.Embedding else _linear_of_held_weight


def _only_in(weight, modules, model) -> bool:
    """Whether every module of `model` holding `weight` is among `modules` (a weight tied to a module
    whose forward is not replaced must keep its dtype there)."""
    return all(any(m is c for c in modules) for m in model.modules() if m._parameters.get("weight") is weight)


@torch.compiler.disable
def _linear_of_held_weight(self, x):
    """Under autocast the product is autocast's, as stock computes it from the fp32 weight; otherwise in
    x's dtype from the exact fp32 values."""
    weight = self.weight
    if not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
    return torch.nn.functional.linear(x, weight)


def hold_in_bf16(model: torch.nn.Module) -> int:
    """Holds the frozen fp32 input embedding and LM head weights that are exact bf16 values in bf16 (half
    their memory, and a head matmul without a cast of its weight), their modules returning what they
    returned before: the embedding upcasts its rows, the head computes as before (exactly: the values
    are the same). A weight tied to both is narrowed once, and only if both take it."""
    get_input = getattr(model, "get_input_embeddings", None)
    lm = causal_lm(model)
    served = [m for m in (get_input() if get_input else None, None if lm is None else lm._modules["lm_head"])
              if m is not None and not is_patched(m) and _servable(m)]
    held = 0
    for weight in {id(m.weight): m.weight for m in served}.values():  # a tied weight once
        if not (_bf16_exact(weight) and _only_in(weight, served, model)):
            continue
        vars(weight)[_HELD_DTYPE] = weight.dtype
        weight.data = weight.data.to(torch.bfloat16)
        held += 1
        for module in served:
            if module.weight is weight:
                replace_forward(module, _held_forward(module))
    return held


def release_bf16_holds(model: torch.nn.Module) -> None:
    for p in model.parameters():
        dtype = vars(p).pop(_HELD_DTYPE, None)
        if dtype is not None:
            p.data = p.data.to(dtype)

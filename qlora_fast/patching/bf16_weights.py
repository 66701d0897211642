"""patch_model's `bf16_frozen_weights`: frozen fp32 embedding and head weights that hold only bf16
values, held in bf16."""

import torch

from .core import is_patched, previous_forward, replace_forward
from .loss import causal_lm


_HELD_DTYPE = "_qlora_fast_held_dtype"  # on a weight hold_in_bf16 narrowed: the dtype it had


def _bf16_holdable(module) -> bool:
    """A plain Embedding or Linear whose frozen fp32 weight holds only bf16 values (what
    prepare_model_for_kbit_training makes of a bf16 checkpoint's embeddings and head)."""
    weight = getattr(module, "weight", None)
    return (type(module) in (torch.nn.Embedding, torch.nn.Linear) and type(weight) is torch.nn.Parameter
            and weight.dtype == torch.float32 and not weight.requires_grad
            and getattr(module, "bias", None) is None
            and bool(torch.equal(weight, weight.to(torch.bfloat16).float())))


@torch.compiler.disable
def _embedding_of_held_weight(self, input_ids):
    return previous_forward(self)(input_ids).to(vars(self.weight)[_HELD_DTYPE])


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
    are the same). A weight tied to both is narrowed once."""
    get_input = getattr(model, "get_input_embeddings", None)
    candidates = [get_input() if get_input else None]
    lm = causal_lm(model)
    candidates.append(None if lm is None else lm._modules["lm_head"])
    held = 0
    for module in candidates:
        if module is None or is_patched(module) or not (_bf16_holdable(module) or _HELD_DTYPE in vars(module.weight)):
            continue
        weight = module.weight
        if _HELD_DTYPE not in vars(weight):
            vars(weight)[_HELD_DTYPE] = weight.dtype
            weight.data = weight.data.to(torch.bfloat16)
            held += 1
        embedding = type(module) is torch.nn.Embedding
        replace_forward(module, _embedding_of_held_weight if embedding else _linear_of_held_weight)
    return held


def release_bf16_holds(model: torch.nn.Module) -> None:
    for p in model.parameters():
        dtype = vars(p).pop(_HELD_DTYPE, None)
        if dtype is not None:
            p.data = p.data.to(dtype)

"""patch_model's `rope`: the rotary embedding of q and k through the Triton kernel."""

import sys

import torch

from ..ops.adapters import wider
from ..ops.forward_only import apply
from ..ops.rope import RoPEFunction, fused_rope_applies
from .architectures import has
from .core import ATTENTION_INPUTS, CALLS


def _rotary_modules(model: torch.nn.Module) -> list:
    """The modeling modules (transformers.models.llama.modeling_llama, ...) of the model's attentions."""
    names = {type(m).__module__ for m in model.modules() if has(m, "rotary")}
    return [sys.modules[n] for n in sorted(names) if hasattr(sys.modules[n], "apply_rotary_pos_emb")]


def _fused_rotary(stock):
    """A drop-in for a modeling module's apply_rotary_pos_emb: the Triton kernel where it is exact, its
    outputs written in the dtype the attention rounds them to where that is narrower (core.ATTENTION_INPUTS)."""

    @torch.compiler.disable
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not args and fused_rope_applies(q, k, cos, sin, **kwargs):
            CALLS["rope"] += 1
            rounded_to = ATTENTION_INPUTS.rounded_to
            out_dtype = rounded_to if rounded_to is not None and wider(q.dtype, rounded_to) else None
            return apply(RoPEFunction, q, k, cos, sin, out_dtype)
        return stock(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.qlora_fast_stock = stock
    return apply_rotary_pos_emb


def patch_rotary(model: torch.nn.Module) -> bool:
    """Routes rotary embeddings through the kernel. The function is a module global that attention looks
    up at call time, so this holds for every model of that architecture in the process, as unsloth's does;
    the drop-in computes what the stock function does, rounding included."""
    modules = _rotary_modules(model)
    for module in modules:
        if not hasattr(module.apply_rotary_pos_emb, "qlora_fast_stock"):
            module.apply_rotary_pos_emb = _fused_rotary(module.apply_rotary_pos_emb)
    return bool(modules)


def restore_rotary(model: torch.nn.Module) -> None:
    for module in _rotary_modules(model):
        module.apply_rotary_pos_emb = getattr(module.apply_rotary_pos_emb, "qlora_fast_stock",
                                              module.apply_rotary_pos_emb)

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


def _passed_through(q, k, cos, sin, args, kwargs):
    """q and k as they are, where they are the fused q/k/v's outputs it returned rotated with these cos and
    sin (as the attention views them); anything else while such outputs are pending means the attention
    changed them on the way, which the architecture table says it does not."""
    rotated, offered = ATTENTION_INPUTS.rotated, ATTENTION_INPUTS.rotary
    ATTENTION_INPUTS.rotated = None
    heads = lambda t, like: t.view(*t.shape[:2], -1, like.shape[-1]).transpose(1, 2)
    if (not args and kwargs.get("unsqueeze_dim", 1) == 1 and offered is not None and cos is offered[0]
            and sin is offered[1] and all(t.data_ptr() == r.data_ptr() and t.shape == heads(r, t).shape
                                          and t.stride() == heads(r, t).stride() for t, r in zip((q, k), rotated))):
        return q, k
    raise RuntimeError("qlora_fast: this attention changed q or k between its projections and RoPE, which the fused "
                       "q/k/v had already rotated; patch the model with rope=False (and report the model class)")


def _fused_rotary(stock):
    """A drop-in for a modeling module's apply_rotary_pos_emb: the Triton kernel where it is exact, its
    outputs written in the dtype the attention rounds them to where that is narrower (core.ATTENTION_INPUTS);
    q and k the fused q/k/v returned already rotated, as they are."""

    @torch.compiler.disable
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if ATTENTION_INPUTS.rotated is not None:
            return _passed_through(q, k, cos, sin, args, kwargs)
        if not args and fused_rope_applies(q, k, cos, sin, **kwargs):
            CALLS["rope"] += 1
            rounded_to = ATTENTION_INPUTS.rounded_to
            out_dtype = rounded_to if rounded_to is not None and wider(q.dtype, rounded_to) else None
            return apply(RoPEFunction, q, k, cos, sin, out_dtype)
        return stock(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.qlora_fast_stock = stock
    return apply_rotary_pos_emb


def rotates_through_drop_in(attention) -> bool:
    """Whether this attention's RoPE is the drop-in's (patch_model's `rope` on its modeling module)."""
    module = sys.modules.get(type(attention).__module__)
    return hasattr(getattr(module, "apply_rotary_pos_emb", None), "qlora_fast_stock")


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

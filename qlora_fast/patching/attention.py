"""The attention implementation patch_model registers: transformers' sdpa, except where a switch serves a call.

Two patch_model switches act inside transformers' attention function: `packed_attention`
(patching/packed_attention.py: a padding-free packed batch attends within each of its sequences) and
`keep_attention_outputs` (patching/kept_outputs.py: inside an offloaded checkpoint, causal attention keeps
its output for the recompute). A decoder stack either serves is switched to one registered implementation,
IMPLEMENTATION, which sends each call of an attention module
- to ops/packed_attention when the module is marked PACKS and the stack's forward is a packed batch,
- to ops/kept_attention when it is marked KEEPS, runs inside an offloaded checkpoint (its first pass or
  its recompute) and sdpa would compute plain causal attention there,
- to transformers' sdpa_attention_forward otherwise, unchanged.
"""

import inspect
import threading

import torch

from ..ops.kept_attention import kept_attention
from ..ops.offloaded_checkpoint import keeping, recomputing
from ..ops.packed_attention import PackedSequences, packed_attention
from .architectures import has
from .core import CALLS

IMPLEMENTATION = "qlora_fast_sdpa"
_STOCK_IMPLEMENTATION = "_qlora_fast_stock_attn_implementation"
PACKS = "_qlora_fast_packs"  # on an attention module: packed batches attend within each sequence
KEEPS = "_qlora_fast_keeps_output"  # on an attention module: its output is kept for the recompute
forward_state = threading.local()  # .packed: the decoder forward running in this thread is a packed batch


def packed_forward() -> bool:
    return getattr(forward_state, "packed", False)


def _mask(*args, **kwargs):
    """sdpa's mask, except none for a packed batch: its attention reads the sequences instead."""
    from transformers.masking_utils import sdpa_mask

    return None if packed_forward() else sdpa_mask(*args, **kwargs)


def given_sequences(kwargs) -> PackedSequences:
    """The sequences a call's flash-attention kwargs name (TRL's, or the packed pre-hook's)."""
    cu_seqlens, max_length = kwargs["cu_seq_lens_q"], kwargs.get("max_length_q")
    return PackedSequences(cu_seqlens, int(cu_seqlens.diff().max() if max_length is None else max_length))


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    marks = vars(module)
    packed = kwargs.get("cu_seq_lens_q") is not None and attention_mask is None and query.shape[2] == key.shape[2]
    if packed and marks.get(PACKS):
        if dropout or kwargs.get("softcap") is not None:
            raise RuntimeError("qlora_fast: a packed batch reached an attention with dropout or softcapping, which "
                               "packed attention does not compute; pass patch_model(..., packed_attention=False)")
        CALLS["packed_attention"] += 1
        return packed_attention(query, key, value, given_sequences(kwargs), scaling), None
    if marks.get(KEEPS) and (keeping() or recomputing()) and _plain_causal(module, query, key, attention_mask,
                                                                            dropout, kwargs):
        CALLS["kept_attention"] += 1
        return kept_attention(module, query, key, value, scaling).transpose(1, 2).contiguous(), None
    if attention_mask is None and packed_forward():
        raise RuntimeError("qlora_fast: a packed batch reached attention without its sequence bounds (this model's "
                           "layers do not forward attention kwargs); pass patch_model(..., packed_attention=False)")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _plain_causal(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """Whether sdpa would compute plain causal attention here (transformers' rule: no mask, more than one
    query, a causal module), which kept_attention computes the same way."""
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    return (attention_mask is None and not dropout and kwargs.get("softcap") is None and causal
            and kwargs.get("position_bias") is None and query.shape[2] == key.shape[2] > 1 and not packed_forward())


def attentions(stack) -> list:
    return [m for m in stack.modules() if type(m).__name__.endswith("Attention")]


def _unservable_reason(attention) -> str | None:
    """Why neither switch can stand in for this attention, or None: it must be causal softmax attention
    through transformers' attention functions, without dropout or softcapping."""
    if getattr(attention, "attn_logit_softcapping", None) is not None:
        return "softcapped attention scores"
    if getattr(attention, "attention_dropout", 0.0):
        return "attention dropout"
    if not has(attention, "attention_interface"):
        return f"{type(attention).__name__} is not in the architecture table"
    return None


def stack_refusal(stack) -> str | None:
    """Why this decoder stack's attention calls cannot be served, or None."""
    found = attentions(stack)
    if not found:
        return "no attention modules found"
    reason = next(filter(None, map(_unservable_reason, found)), None)
    if reason is not None:
        return reason
    implementation = vars(stack).get(_STOCK_IMPLEMENTATION, stack.config._attn_implementation)
    if implementation != "sdpa":
        return f"attention implementation {implementation!r}; load with attn_implementation='sdpa'"
    return None


def decoder_stacks(model) -> list:
    """The transformers models inside `model` that run a ModuleList of layers through sdpa or eager
    attention (or IMPLEMENTATION, installed already) and pass their keyword arguments on to them."""
    from transformers import PreTrainedModel

    def passes_kwargs_on(forward) -> bool:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)
            and isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
            and getattr(m.config, "_attn_implementation", None) in ("sdpa", "eager", IMPLEMENTATION)
            and passes_kwargs_on(m.forward)]


def install(stack, mark: str) -> None:
    """Switches `stack` to IMPLEMENTATION (once) and marks its attentions with `mark`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)
    if _STOCK_IMPLEMENTATION not in vars(stack):
        vars(stack)[_STOCK_IMPLEMENTATION] = stack.config._attn_implementation
        stack.config._attn_implementation = IMPLEMENTATION
    for attention in attentions(stack):
        vars(attention)[mark] = True


def installed(stack, mark: str) -> bool:
    return any(vars(a).get(mark) for a in attentions(stack))


def restore_attention(model: torch.nn.Module) -> None:
    """Gives every stack its own attention implementation back and clears the marks."""
    for m in model.modules():
        for mark in (PACKS, KEEPS):
            vars(m).pop(mark, None)
        stock = vars(m).pop(_STOCK_IMPLEMENTATION, None)
        if stock is not None:
            m.config._attn_implementation = stock

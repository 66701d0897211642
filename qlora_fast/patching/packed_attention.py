"""patch_model's `packed_attention`: a padding-free packed batch attends within each of its sequences.

TRL's `packing=True` (and axolotl-style `sample_packing`) hands the model rows of concatenated sequences
with position_ids restarting at each one and no attention mask. For sdpa, transformers turns that into a
dense block-causal mask and computes the row's whole causal triangle. Patched, the decoder stack finds the
sequences once per forward (a pre-hook, transformers' rule on position_ids, or the `cu_seq_lens_*` TRL may
pass), hands them to every attention as the flash-attention kwargs transformers already forwards (so
checkpoint recomputes get them too), skips the dense mask, and each attention runs ops/packed_attention.
Any other batch (a mask, a cache, one sequence per row, a sequence longer than a sliding window) takes
transformers' sdpa path unchanged. RoPE is untouched: transformers computes it from position_ids.
"""

import inspect
import threading
from functools import partial

import torch

from ..ops.kept_attention import kept_attention
from ..ops.packed_attention import PackedSequences, find_packed_sequences, packed_attention, worth_it_on
from .architectures import has
from .core import CALLS

IMPLEMENTATION = "qlora_fast_sdpa"  # transformers' sdpa, except for packed batches
_STOCK_IMPLEMENTATION = "_qlora_fast_stock_attn_implementation"
_HOOKS = "_qlora_fast_packed_hooks"
_forward = threading.local()  # .packed: the decoder forward running in this thread is a packed batch
# Causal attention without a mask keeps its output for the checkpoint's recompute (ops/kept_attention.py):
# bench/recipes.py's keep_attention candidate, timed before it is a default (bench/NOTES.md, session 18).
KEEP_ATTENTION_OUTPUT = False


def _mask(*args, **kwargs):
    """sdpa's mask, except none for a packed batch: its attention reads the sequences instead."""
    from transformers.masking_utils import sdpa_mask

    return None if getattr(_forward, "packed", False) else sdpa_mask(*args, **kwargs)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and attention_mask is None and query.shape[2] == key.shape[2]:
        if dropout or kwargs.get("softcap") is not None:
            raise RuntimeError("qlora_fast: a packed batch reached an attention with dropout or softcapping, which "
                               "packed attention does not compute; pass patch_model(..., packed_attention=False)")
        CALLS["packed_attention"] += 1
        return packed_attention(query, key, value, _sequences(kwargs), scaling), None
    if KEEP_ATTENTION_OUTPUT and _keeps_output(module, query, key, attention_mask, dropout, kwargs):
        CALLS["kept_attention"] += 1
        return kept_attention(module, query, key, value, scaling).transpose(1, 2).contiguous(), None
    if attention_mask is None and getattr(_forward, "packed", False):
        raise RuntimeError("qlora_fast: a packed batch reached attention without its sequence bounds (this model's "
                           "layers do not forward attention kwargs); pass patch_model(..., packed_attention=False)")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _keeps_output(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """Whether sdpa would compute plain causal attention here (transformers' rule: no mask, more than one
    query, a causal module), which kept_attention computes the same way."""
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    return (attention_mask is None and not dropout and kwargs.get("softcap") is None and causal
            and kwargs.get("position_bias") is None
            and query.shape[2] == key.shape[2] > 1 and not getattr(_forward, "packed", False))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)


def _uses_cache(stack, kwargs) -> bool:
    """Whether the stack's forward will build a KV cache, as transformers decides it (a cache turns off its
    packed-sequence mask, so the batch must take the stock path to compute what stock computes)."""
    if kwargs.get("past_key_values") is not None:
        return True
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(stack.config, "use_cache", False)
    return bool(use_cache) and not (getattr(stack, "gradient_checkpointing", False) and stack.training)


def _sequences(kwargs) -> PackedSequences | None:
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:  # the caller's (TRL's flash-attention kwargs), or the pre-hook's
        max_length = kwargs.get("max_length_q")
        return PackedSequences(cu_seqlens, int(cu_seqlens.diff().max() if max_length is None else max_length))
    position_ids, tokens = kwargs.get("position_ids"), kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if position_ids is None or tokens is None:
        return None
    return find_packed_sequences(position_ids, tokens.shape[0])


def _begin_forward(stack, args, kwargs, window):
    _forward.packed = False
    if args or kwargs.get("attention_mask") is not None or _uses_cache(stack, kwargs) or torch.compiler.is_compiling():
        return None
    sequences = _sequences(kwargs)
    if sequences is None or sequences.max_length > window:
        return None
    _forward.packed = True
    return args, {**kwargs, "cu_seq_lens_q": sequences.cu_seqlens, "cu_seq_lens_k": sequences.cu_seqlens,
                  "max_length_q": sequences.max_length, "max_length_k": sequences.max_length}


def _end_forward(stack, args, kwargs, output):
    _forward.packed = False


def _attentions(stack) -> list:
    return [m for m in stack.modules() if type(m).__name__.endswith("Attention")]


def _unservable_reason(attention) -> str | None:
    """Why packed attention cannot stand in for this attention, or None: it must be causal softmax
    attention through transformers' attention functions, without dropout or softcapping."""
    if getattr(attention, "attn_logit_softcapping", None) is not None:
        return "softcapped attention scores"
    if getattr(attention, "attention_dropout", 0.0):
        return "attention dropout"
    if not has(attention, "packed_attention"):
        return f"{type(attention).__name__} is not in the architecture table"
    return None


def _stack_refusal(stack) -> str | None:
    """Why this decoder stack keeps the dense block-causal mask for packed batches, or None."""
    attentions = _attentions(stack)
    if not attentions:
        return "no attention modules found"
    reason = next(filter(None, map(_unservable_reason, attentions)), None)
    if reason is not None:
        return reason
    implementation = stack.config._attn_implementation
    if implementation != "sdpa":
        return f"attention implementation {implementation!r}; load with attn_implementation='sdpa'"
    if not worth_it_on(next(stack.parameters()).device):
        return "no varlen attention kernel on this GPU (flash-attn, or torch's varlen_attn)"
    return None


def _window(stack) -> float:
    """The shortest sliding window of the stack's attentions: longer sequences keep the stock path."""
    config_window = getattr(stack.config, "sliding_window", None)
    windows = [getattr(a, "sliding_window", config_window) for a in _attentions(stack)]
    return min((w for w in windows if w), default=float("inf"))


def _passes_kwargs_on(forward) -> bool:
    """Whether a forward takes **kwargs (transformers' stacks hand them to every layer's attention)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())


def _decoder_stacks(model) -> list:
    """The transformers models inside `model` that build a dense causal mask (sdpa or eager attention) for
    a ModuleList of layers, and pass their keyword arguments on. (Flash-attention implementations attend
    within each packed sequence themselves.)"""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)
            and isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
            and getattr(m.config, "_attn_implementation", None) in ("sdpa", "eager") and _passes_kwargs_on(m.forward)]


def use_packed_attention(model: torch.nn.Module) -> tuple[int, str | None]:
    """Installs packed attention on every servable decoder stack; returns how many have it, and why a stack
    that does not keeps the dense mask (None if every one has it)."""
    installed = sum(_HOOKS in vars(m) for m in model.modules())
    refusals = {s: _stack_refusal(s) for s in _decoder_stacks(model) if _HOOKS not in vars(s)}
    stacks = [s for s, reason in refusals.items() if reason is None]
    if stacks:
        _register()
    for stack in stacks:
        vars(stack)[_STOCK_IMPLEMENTATION] = stack.config._attn_implementation
        stack.config._attn_implementation = IMPLEMENTATION
        vars(stack)[_HOOKS] = (
            stack.register_forward_pre_hook(partial(_begin_forward, window=_window(stack)), with_kwargs=True),
            stack.register_forward_hook(_end_forward, with_kwargs=True, always_call=True))
    return installed + len(stacks), next(filter(None, refusals.values()), None)


def restore_packed_attention(model: torch.nn.Module) -> None:
    for m in model.modules():
        for handle in vars(m).pop(_HOOKS, ()):
            handle.remove()
        stock = vars(m).pop(_STOCK_IMPLEMENTATION, None)
        if stock is not None:
            m.config._attn_implementation = stock

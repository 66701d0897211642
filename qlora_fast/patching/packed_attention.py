"""patch_model's `packed_attention`: a padding-free packed batch attends within each of its sequences.

TRL's `packing=True` (and axolotl-style `sample_packing`) hands the model rows of concatenated sequences
with position_ids restarting at each one and no attention mask. For sdpa, transformers turns that into a
dense block-causal mask and computes the row's whole causal triangle. Patched, the decoder stack finds the
sequences once per forward (a pre-hook, transformers' rule on position_ids, or the `cu_seq_lens_*` TRL may
pass), hands them to every attention as the flash-attention kwargs transformers already forwards (so
checkpoint recomputes get them too), skips the dense mask, and each attention runs ops/packed_attention
(through patching/attention.py's attention implementation).
Any other batch (a mask, a cache, one sequence per row, a sequence longer than a sliding window) takes
transformers' sdpa path unchanged. RoPE is untouched: transformers computes it from position_ids.
"""

from functools import partial

import torch

from ..ops.packed_attention import PackedSequences, find_packed_sequences, worth_it_on
from .attention import PACKS, attentions, decoder_stacks, forward_state, given_sequences, install, installed, \
    stack_refusal

_HOOKS = "_qlora_fast_packed_hooks"


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
    if kwargs.get("cu_seq_lens_q") is not None:  # the caller's (TRL's flash-attention kwargs)
        return given_sequences(kwargs)
    position_ids, tokens = kwargs.get("position_ids"), kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if position_ids is None or tokens is None:
        return None
    return find_packed_sequences(position_ids, tokens.shape[0])


def _begin_forward(stack, args, kwargs, window):
    forward_state.packed = False
    if args or kwargs.get("attention_mask") is not None or _uses_cache(stack, kwargs) or torch.compiler.is_compiling():
        return None
    sequences = _sequences(kwargs)
    if sequences is None or sequences.max_length > window:
        return None
    forward_state.packed = True
    return args, {**kwargs, "cu_seq_lens_q": sequences.cu_seqlens, "cu_seq_lens_k": sequences.cu_seqlens,
                  "max_length_q": sequences.max_length, "max_length_k": sequences.max_length}


def _end_forward(stack, args, kwargs, output):
    forward_state.packed = False


def _stack_refusal(stack) -> str | None:
    """Why this decoder stack keeps the dense block-causal mask for packed batches, or None."""
    reason = stack_refusal(stack)
    if reason is None and not worth_it_on(next(stack.parameters()).device):
        return "no varlen attention kernel on this GPU (flash-attn, or torch's varlen_attn)"
    return reason


def _window(stack) -> float:
    """The shortest sliding window of the stack's attentions: longer sequences keep the stock path."""
    config_window = getattr(stack.config, "sliding_window", None)
    windows = [getattr(a, "sliding_window", config_window) for a in attentions(stack)]
    return min((w for w in windows if w), default=float("inf"))


def use_packed_attention(model: torch.nn.Module) -> tuple[int, str | None]:
    """Installs packed attention on every servable decoder stack; returns how many have it, and why a stack
    that does not keeps the dense mask (None if every one has it)."""
    stacks = decoder_stacks(model)
    done = sum(installed(s, PACKS) for s in stacks)
    refusals = {s: _stack_refusal(s) for s in stacks if not installed(s, PACKS)}
    servable = [s for s, reason in refusals.items() if reason is None]
    for stack in servable:
        install(stack, PACKS)
        vars(stack)[_HOOKS] = (
            stack.register_forward_pre_hook(partial(_begin_forward, window=_window(stack)), with_kwargs=True),
            stack.register_forward_hook(_end_forward, with_kwargs=True, always_call=True))
    return done + len(servable), next(filter(None, refusals.values()), None)


def remove_packed_hooks(model: torch.nn.Module) -> None:
    for m in model.modules():
        for handle in vars(m).pop(_HOOKS, ()):
            handle.remove()

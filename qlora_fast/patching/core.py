"""Installing a forward on one module instance and restoring it; the per-module state the patches keep;
fused-call counts and fallback notes shared by the patches."""

import os
import threading
import types
import warnings
from collections import Counter

import torch


PATCHED = "_qlora_fast_patched"
OUTPUT_ONLY_TO_RESIDUAL = "_qlora_fast_output_only_to_residual"  # see mark_residual_mlps
KV_SIBLINGS = "_qlora_fast_kv_siblings"  # on a q_proj: its (k_proj, v_proj), see fused_qkv_forward
STASHED = "_qlora_fast_stashed_output"  # on a k_proj / v_proj: (input, output) its q_proj computed
OUTPUT_UNREAD_IN_RECOMPUTE = "_qlora_fast_output_unread_in_recompute"  # see add_norm_layer_forward
ROW_BLOCKS = "_qlora_fast_row_blocks"  # on a fused projection: (its NF4Weight, widths, its row blocks' NF4Weights)
KEEP_OUTPUT = "_qlora_fast_keep_output"  # on an attention projection: see patching/kept_outputs.py
_PER_MODULE_STATE = (OUTPUT_ONLY_TO_RESIDUAL, KV_SIBLINGS, STASHED, OUTPUT_UNREAD_IN_RECOMPUTE, ROW_BLOCKS,
                     KEEP_OUTPUT)


INSTALLED = "_qlora_fast_installed_forward"  # the function replace_forward installed
PASSING_THROUGH = "_qlora_fast_passing_through"  # unpatched, but wrapped over by another library: see below


def replace_forward(module: torch.nn.Module, forward) -> None:
    """Installs `forward` on this instance, remembering an instance-level forward another library (TRL,
    accelerate) may have wrapped it with, so that falling back goes through that wrapper. A forward left
    inside another library's wrapper by restore_forward is switched back on where it is."""
    if is_patched(module):
        return
    if vars(module).pop(PASSING_THROUGH, False) and vars(module).get(INSTALLED) is forward:
        setattr(module, PATCHED, True)
        return
    module._qlora_fast_previous_forward = vars(module).get("forward")
    module.forward = types.MethodType(forward, module)
    vars(module)[INSTALLED] = forward
    setattr(module, PATCHED, True)


def restore_forward(module: torch.nn.Module) -> bool:
    """Takes the installed forward off. Where another library has wrapped it since (TRL installs its fused
    head over the causal LM's forward when a trainer is built) and the forward can pass calls through
    (`passes_through_when_unpatched`), the wrapper stays and the forward inside it calls the previous one."""
    if not is_patched(module):
        return False
    for state in _PER_MODULE_STATE:
        vars(module).pop(state, None)
    delattr(module, PATCHED)
    installed = vars(module)[INSTALLED]
    if called_forward(module) is not installed and getattr(installed, "passes_through_when_unpatched", False):
        vars(module)[PASSING_THROUGH] = True
        return True
    previous = vars(module).pop("_qlora_fast_previous_forward")
    vars(module).pop(INSTALLED)
    del module.forward
    if previous is not None:
        module.forward = previous
    return True


def called_forward(module: torch.nn.Module):
    """The function behind the forward this instance calls now (its installed one, or None where it has none
    of its own, or another library wrapped it since)."""
    return getattr(vars(module).get("forward"), "__func__", None)


def previous_forward(module: torch.nn.Module):
    previous = vars(module).get("_qlora_fast_previous_forward")
    return previous if previous is not None else types.MethodType(type(module).forward, module)


def stock_forward(layer, x, *args, **kwargs):
    return previous_forward(layer)(x, *args, **kwargs)


def is_patched(module: torch.nn.Module) -> bool:
    # vars(), not getattr: peft's wrappers forward attribute lookups to the model they wrap
    return vars(module).get(PATCHED, False)


def has_hooks(module) -> bool:
    """Hooks (peft's per-sample adapter_names, accelerate's offload) run only if the projection is called.
    Asked several times per layer call: accelerate's `_hf_hook` is looked for in the instance dict, where
    accelerate sets it (hasattr would raise and catch an AttributeError through nn.Module.__getattr__)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "_hf_hook" in module.__dict__)


# Calls of each fused Function since the last reset_call_counts(), and layer calls that fell back to peft's
# path, by reason: the parity harness requires fused calls of every kind it patched.
CALLS: Counter = Counter()


def reset_call_counts() -> None:
    CALLS.clear()


_warned: set = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def fallback(reason: str) -> None:
    """A layer call that takes peft's path for `reason`: counted, and said once per reason."""
    CALLS["fallback: " + reason] += 1
    warn_once(f"qlora_fast: some LoRA layer calls run on peft's path: {reason}")


# On a norm's output written narrower than stock writes it (patching/norms.py): the dtype stock gives it.
# A tensor attribute, so that it travels with the tensor to the projections the attention or MLP hands it.
NARROWED_FROM = "_qlora_fast_narrowed_from"


def stock_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x has on the stock path: its own, or the one it was narrowed from."""
    return getattr(x, NARROWED_FROM, None) or x.dtype


def widened(x: torch.Tensor) -> torch.Tensor:
    """x in its stock dtype, for a path that would not round it first (exact: the narrowing dropped only
    bits such a consumer drops)."""
    narrowed_from = getattr(x, NARROWED_FROM, None)
    return x if narrowed_from is None else x.to(narrowed_from)


class _AttentionInputs(threading.local):
    """While a patched decoder layer runs its attention (patching/norms.py): the dtype that attention's
    function rounds q, k and v to before any other use of them, or None. The RoPE drop-in and the fused
    q/k/v Function write them in that dtype, which spares the wide writes and the attention's casts.
    `rotary`: the layer's (cos, sin) where its attention rotates q_proj's and k_proj's outputs with them
    through the RoPE drop-in (architectures' rotary_projections), offered to the fused q/k/v to rotate;
    `rotated`: the (q, k) it returned rotated, for the drop-in to pass through once."""

    rounded_to: torch.dtype | None = None
    rotary: tuple | None = None
    rotated: tuple | None = None


ATTENTION_INPUTS = _AttentionInputs()


def distributed() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1

"""patch_model's `keep_attention_outputs`: the attention's outputs kept for the recompute.

With offloaded checkpoints, a decoder layer's backward first runs its forward again. Kept in host memory
beside the layer's input (ops/offloaded_checkpoint.py), what the attention block computed comes back
instead of being computed again: the same values, so exact for any architecture.
- The q/k/v and o projections' base products x @ W^T, about a fifth of that recompute on Llama-3-8B.
- The attention's own output and logsumexp, where sdpa computes plain causal attention (no mask: batches
  without padding, not packed) in a decoder stack run through sdpa (ops/kept_attention.py, through
  patching/attention.py's attention implementation): the attention's forward, ~1.7% of a Llama-3-8B step.
The price is host traffic: per token and layer, q + k + v + o + the attention's output columns in the
compute dtype (Llama-3-8B: 14,336 against the input's 4,096), copied while the GPU computes; a copy that
falls behind is skipped and that product recomputed.
"""

import torch

from .attention import KEEPS, decoder_stacks, install, installed, stack_refusal
from .core import KEEP_OUTPUT, is_patched

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
# Candidate (bench/recipes.py CANDIDATES, "attention_results_only"; its timings in bench/NOTES.md): keep the
# attention's output and logsumexp but not the projections' products (4/5 of the kept bytes), for layers that
# compute too little to cover their copies (a kept GB costs ~18 ms of copy each way over PCIe and saves ~4 ms
# of GEMM, so keeps pay only while the copies hide behind the compute).
ATTENTION_RESULTS_ONLY = False


def mark_attention_outputs(model: torch.nn.Module) -> int:
    """Marks each patched LoRA layer that is a module's q/k/v/o (or fused qkv) projection; returns how many
    (none while the candidate ATTENTION_RESULTS_ONLY is on)."""
    if ATTENTION_RESULTS_ONLY:
        return 0
    marked = 0
    for module in model.modules():
        for name in ATTENTION_PROJECTIONS:
            projection = module._modules.get(name)
            if projection is not None and is_patched(projection):
                vars(projection)[KEEP_OUTPUT] = True
                marked += 1
    return marked


def keep_attention_results(model: torch.nn.Module) -> int:
    """Has every servable decoder stack's attentions keep their output and logsumexp; returns how many
    stacks do."""
    stacks = [s for s in decoder_stacks(model) if installed(s, KEEPS) or stack_refusal(s) is None]
    for stack in stacks:
        install(stack, KEEPS)
    return len(stacks)

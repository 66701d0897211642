"""patch_model's `keep_attention_outputs`: the attention projections' base outputs kept for the recompute.

With offloaded checkpoints, a decoder layer's backward first runs its forward again. The q/k/v and o
projections' base products x @ W^T are about a fifth of that recompute on Llama-3-8B; kept in host memory
beside the layer's input (ops/offloaded_checkpoint.py), they come back instead of being recomputed: the
same values, so exact for any architecture. The price is host traffic: per token and layer, q + k + v + o
columns in the compute dtype (Llama-3-8B: 10,240 against the input's 4,096), copied while the GPU computes.
"""

import torch

from .core import KEEP_OUTPUT, is_patched

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


def mark_attention_outputs(model: torch.nn.Module) -> int:
    """Marks each patched LoRA layer that is a module's q/k/v/o (or fused qkv) projection; returns how many."""
    marked = 0
    for module in model.modules():
        for name in ATTENTION_PROJECTIONS:
            projection = module._modules.get(name)
            if projection is not None and is_patched(projection):
                vars(projection)[KEEP_OUTPUT] = True
                marked += 1
    return marked

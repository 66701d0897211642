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
falls behind is skipped and that product recomputed. The projections' products, 4/5 of those bytes, are kept
only in layers that compute enough per copied byte to hide the copies (MIN_MACS_PER_COPIED_BYTE).
"""

import torch

from .attention import KEEPS, decoder_stacks, install, installed, stack_refusal
from .core import KEEP_OUTPUT, is_patched

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
# A kept product pays only while its copy to the host hides behind the layer's compute: 2 * MACs / GEMM rate
# >= copied bytes / copy rate. With an H100's ~600 TFLOP/s in our NF4 GEMMs and ~55 GB/s of pinned copies
# that is ~5,400 multiply-adds per byte; copies that run late still overlap the next layers, so the measured
# break-even is lower: keeping the projections made Llama-3-8B (5,900 per byte) 5% faster and Phi-3.5-mini
# (3,100) 5-10% slower at 4x2048 (bench/RESULTS.md, session 27).
MIN_MACS_PER_COPIED_BYTE = 4500


def macs_per_copied_byte(layer: torch.nn.Module) -> float:
    """A decoder layer's multiply-adds a token (its linear layers, adapters aside) per byte a token that keeping
    its attention projections' products copies to the host: the layer's input, q/k/v, o's output and the
    attention's output, two bytes an element (the compute dtype)."""
    linears = [m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    macs = sum(m.in_features * m.out_features for m in linears)
    attention = next((m for m in layer.modules() if "o_proj" in m._modules), None)
    if attention is None:
        return 0.0
    outputs = sum(getattr(attention, name).out_features for name in ATTENTION_PROJECTIONS if name in attention._modules)
    # the projections' outputs, then the layer's input (o's output width) and the attention's output (o's input)
    elements = outputs + attention.o_proj.out_features + attention.o_proj.in_features
    return macs / (2 * elements)


def _copies_to_host(layer: torch.nn.Module) -> bool:
    """Whether what the layer keeps is copied to the host: on a GPU. Elsewhere a kept tensor stays where it is."""
    return any(p.device.type == "cuda" for p in layer.parameters())


def _keeps_projection_products(layer: torch.nn.Module) -> bool:
    return not _copies_to_host(layer) or macs_per_copied_byte(layer) >= MIN_MACS_PER_COPIED_BYTE


def mark_attention_outputs(model: torch.nn.Module) -> int:
    """Marks each patched LoRA layer that is the q/k/v/o (or fused qkv) projection of a decoder layer (an item
    of a ModuleList) that keeps its projections' products; returns how many."""
    marked = 0
    layers = [layer for m in model.modules() if isinstance(m, torch.nn.ModuleList) for layer in m]
    for layer in filter(_keeps_projection_products, layers):
        for module in layer.modules():
            for name in ATTENTION_PROJECTIONS:
                projection = module._modules.get(name)
                if projection is not None and is_patched(projection) and not vars(projection).get(KEEP_OUTPUT):
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

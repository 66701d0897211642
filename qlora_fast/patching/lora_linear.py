"""patch_model's LoRA layers: each LoRA NF4 layer's forward through the fused linear Function (a q_proj
through the fused q/k/v one where its attention takes it)."""

import torch

from ..ops.lora_nf4_linear import lora_nf4_linear
from .core import CALLS, KEEP_OUTPUT, KV_SIBLINGS, STASHED, stock_forward, widened
from .projections import adapter_dropout, compute_dtype, fused_projection
from .qkv import fused_qkv_forward


@torch.compiler.disable
def lora_layer_forward(self, x, *args, **kwargs):
    """Fused path for one active adapter; extra arguments (per-sample adapter_names) or a state
    `fused_projection` refuses go through peft's forward. A k_proj / v_proj returns what its q_proj
    computed for this same input; a q_proj computes all three when it can."""
    stashed = vars(self).pop(STASHED, None)
    if stashed is not None and stashed[0] is x and not (args or kwargs):
        return stashed[1]
    siblings = vars(self).get(KV_SIBLINGS)
    q = None if siblings is None or args or kwargs else fused_qkv_forward(self, siblings, x)
    if q is not None:
        return q
    x = widened(x)  # handed on narrowed for the fused q/k/v, which did not take it
    if args or kwargs:
        return stock_forward(self, x, *args, **kwargs)
    projection = fused_projection(self)
    if projection is None:
        return stock_forward(self, x, *args, **kwargs)
    CALLS["linear"] += 1
    dropout = adapter_dropout(self, projection.adapter)
    x_lora = x
    if not isinstance(dropout, torch.nn.Identity):
        # Dropout on x in the adapter's dtype, as peft draws it, so both paths drop the same elements.
        x_lora = dropout(x if torch.is_autocast_enabled() else x.to(projection.lora_a.dtype))
    return lora_nf4_linear(x, x_lora, projection.lora_a, projection.lora_b, projection.scaling, projection.weight,
                           self._modules["base_layer"].bias, compute_dtype(self, x),
                           keep_output=vars(self).get(KEEP_OUTPUT, False))

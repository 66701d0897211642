"""The LoRA NF4 layers patch_model serves, and what a fused Function takes of each for its active adapter."""

from typing import NamedTuple

import torch

from ..nf4 import NF4Weight, cached_nf4_weight, nf4_rows, unsupported_reason
from .core import CALLS, ROW_BLOCKS, fallback, has_hooks, warn_once

try:
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
except ImportError:  # older bitsandbytes
    fix_4bit_weight_quant_state_from_module = None


def lora_nf4_layers(model: torch.nn.Module):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]


def static_skip_reason(layer) -> str | None:
    """Why this layer can never take the fused path (checked once, at patch time)."""
    if getattr(layer, "lora_variant", None):
        kinds = sorted({type(v).__name__.removesuffix("LinearVariant") or "variant"
                        for v in layer.lora_variant.values()})
        return f"LoRA variant {'/'.join(kinds)}"
    if any(layer.use_dora.values()):
        return "DoRA"
    if any(b.bias is not None for b in layer.lora_B.values()):
        return "lora_bias"
    base = layer.base_layer
    if base.bias is not None and base.bias.requires_grad:
        return "trainable base bias"
    return unsupported_reason(base.weight)


class Projection(NamedTuple):
    """What the fused Functions take of one LoRA NF4 layer, for its one active adapter."""

    adapter: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    weight: NF4Weight


def fused_projection(layer) -> Projection | None:
    """The one active adapter the fused path can serve now, or None (the reason counted and said once):
    disabled, merged, several adapters, a weight bitsandbytes repacked for CPU inference, or hooks on the
    base layer or adapters (accelerate's offload hooks move weights only when the module is called) go
    through peft's forward. Runs per layer call: modules and parameters are read from their dicts, not
    through nn.Module's attribute lookup."""
    base = layer._modules["base_layer"]
    weight = base._parameters["weight"]
    if fix_4bit_weight_quant_state_from_module is not None and getattr(weight, "quant_state", None) is None:
        fix_4bit_weight_quant_state_from_module(base)  # FSDP hands the weight back without its state
        weight = base._parameters["weight"]
    adapters = layer.active_adapters
    lora_a_modules = layer._modules["lora_A"]._modules
    if layer.disable_adapters or layer.merged:  # the forward the user asked for: noted, not a fallback
        CALLS["peft path as asked: adapter disabled or merged"] += 1
        warn_once("qlora_fast: calls with the adapter disabled or merged run on peft's path, as asked")
        return None
    if len(adapters) != 1 or adapters[0] not in lora_a_modules:
        fallback("several active adapters (one at a time is fused)")
        return None
    name = adapters[0]
    nf4 = cached_nf4_weight(weight)
    if nf4 is None:
        fallback(f"weight not servable ({unsupported_reason(weight)})")
        return None
    lora_a_module, lora_b_module = lora_a_modules[name], layer._modules["lora_B"]._modules[name]
    if has_hooks(base) or has_hooks(lora_a_module) or has_hooks(lora_b_module):
        fallback("hooks on the base layer or the adapters (accelerate offload?) run only if they are called")
        return None
    lora_a, lora_b = lora_a_module._parameters["weight"], lora_b_module._parameters["weight"]
    if not (_gathered(lora_a) and _gathered(lora_b)):
        fallback("FSDP shards the LoRA adapters apart from their layers (peft's wrap policy); wrap whole "
                  "decoder layers to use the fused kernels")
        return None
    return Projection(name, lora_a, lora_b, layer.scaling[name], nf4)


def _gathered(weight) -> bool:
    """False for an adapter weight FSDP holds sharded outside its module's own forward (a DTensor, or
    FSDP1's flat-parameter placeholder): only calling the module would gather it."""
    return type(weight).__name__ != "DTensor" and weight.dim() == 2 and weight.numel() > 0


def compute_dtype(layer, x):
    """The dtype stock peft computes the layer in: autocast's where autocast is on (bitsandbytes' F.linear
    and the adapters' Linears then run in it), else the base layer's compute dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return layer._modules["base_layer"].compute_dtype or x.dtype


def adapter_dropout(layer, adapter: str) -> torch.nn.Module:
    return layer._modules["lora_dropout"]._modules[adapter]


def fused_group(projections, uncalled) -> list | None:
    """Each projection's Projection when all of them can run in one Function now: one adapter, no
    dropout, and no hooks on the `uncalled` ones (the Function replaces their calls, so their hooks
    would not run); otherwise None."""
    found = [fused_projection(p) for p in projections]
    if any(f is None for f in found) or len({f.adapter for f in found}) != 1:
        return None
    if any(has_hooks(p) for p in uncalled) or any(
            not isinstance(adapter_dropout(p, found[0].adapter), torch.nn.Identity) for p in projections):
        return None
    return found


def fusable(projection, frozen_bias_ok: bool = False) -> bool:
    """A patchable LoRA NF4 layer which one Function over several projections serves: without base bias,
    or (`frozen_bias_ok`) with a frozen one (static_skip_reason refuses a trainable one)."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return (isinstance(projection, LoraLinear4bit) and static_skip_reason(projection) is None
            and (frozen_bias_ok or projection.base_layer.bias is None))


def nf4_row_blocks(weight: NF4Weight, widths: list) -> list | None:
    """`weight`'s consecutive row blocks of these heights as NF4Weights of views, or None where one does not
    start on a block of scales (it cannot dequantize on its own)."""
    bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
    blocks = [nf4_rows(weight, start, stop) for start, stop in zip(bounds, bounds[1:])]
    return None if None in blocks else blocks


def row_blocks(layer, projection: Projection, widths: list) -> list | None:
    """A fused projection (Phi-3's gate_up_proj, qkv_proj) as the projections it stacks, each (lora_a,
    lora_b, scaling, weight): its NF4 weight's row blocks of these widths (built once per weight and kept
    on the layer), its B's row blocks, and its one A (autograd sums the blocks' A gradients). None where
    a block does not start on a block of scales."""
    weight, bounds = projection.weight, [sum(widths[:i]) for i in range(len(widths) + 1)]
    cached = vars(layer).get(ROW_BLOCKS)
    if cached is None or cached[0] is not weight or cached[1] != widths:
        cached = vars(layer)[ROW_BLOCKS] = (weight, list(widths), nf4_row_blocks(weight, widths))
    if cached[2] is None:
        return None
    return [(projection.lora_a, projection.lora_b[start:stop], projection.scaling, block)
            for start, stop, block in zip(bounds, bounds[1:], cached[2])]

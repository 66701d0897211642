"""Builders of small random QLoRA objects, shared by the tests and the benchmarks."""

import torch
from torch import nn


class _Holder(nn.Module):
    is_loaded_in_4bit = True  # peft dispatches LoRA onto bnb.nn.Linear4bit only for 4-bit models

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer


def make_nf4_linear(out_features: int, in_features: int, dtype=torch.bfloat16, nested: bool = True,
                    device="cpu", bias: bool = False, quant_type: str = "nf4"):
    """A bitsandbytes Linear4bit quantized from a random N(0, 0.02) weight, computing in `dtype`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype,
                              compress_statistics=nested, quant_type=quant_type)
    weight = torch.randn(out_features, in_features, dtype=dtype) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type)
    if bias:
        layer.bias = nn.Parameter(torch.randn(out_features, dtype=dtype) * 0.1, requires_grad=False)
    return layer.to(device)


def make_lora_nf4_linear(out_features: int, in_features: int, r: int = 16, lora_alpha: int = 32,
                         lora_dropout: float = 0.0, use_dora: bool = False, dtype=torch.bfloat16,
                         nested: bool = True, device="cpu", bias: bool = False, quant_type: str = "nf4",
                         lora_dtype=torch.float32):
    """A peft LoRA layer over a random NF4 Linear4bit, B non-zero so that LoRA matters, in train mode.
    The adapters are float32 by default, as peft's get_peft_model makes them for a 4-bit model."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = _Holder(make_nf4_linear(out_features, in_features, dtype, nested, device, bias, quant_type))
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
                        target_modules=["proj"])
    inject_adapter_in_model(config, holder)
    layer = holder.proj
    layer.lora_A.to(lora_dtype)
    layer.lora_B.to(lora_dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer.to(device).train()


def make_lora_nf4_mlp(hidden: int, intermediate: int, r: int = 16, dtype=torch.bfloat16, device="cpu"):
    """A transformers LlamaMLP with NF4 projections and peft LoRA on all three (fp32 adapters, B random)."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from .harness.models import quantize_to_nf4_

    with torch.device(device):
        mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate)).to(dtype)
    holder = quantize_to_nf4_(_Holder(mlp), compute_dtype=dtype)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["gate_proj", "up_proj", "down_proj"]),
                            holder)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return mlp.train()


def forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list:
    """One forward and backward from fresh gradients: [output, x.grad, each parameter gradient in order]."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    return [y, x.grad] + [p.grad for p in module.parameters() if p.grad is not None]

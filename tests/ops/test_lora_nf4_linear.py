"""The fused LoRA layer against peft's own forward/backward on the same layer."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.testing import make_lora_nf4_linear
from tests.helpers import rel_err

# fp32: the same math in another order. fp16/bf16: the fused path computes the LoRA products in the
# compute dtype where peft upcasts them to fp32, a few roundings of 2^-11 / 2^-8 apart.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def forward_backward(layer, x, grad_out, seed=0):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout mask in both runs
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def stock_and_fused(layer, x, grad_out):
    unpatch_model(layer)
    stock = forward_backward(layer, x, grad_out)
    patch_model(layer, verbose=False)
    return stock, forward_backward(layer, x, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("n,k", [(64, 128), (96, 64)])
def test_matches_peft(n, k, dtype, dropout):
    layer = make_lora_nf4_linear(n, k, r=8, lora_alpha=16, lora_dropout=dropout, dtype=dtype)
    x = torch.randn(2, 7, k, dtype=dtype)
    grad_out = torch.randn(2, 7, n, dtype=dtype)
    stock, fused = stock_and_fused(layer, x, grad_out)
    for name, s, f in zip(("y", "dx", "dA", "dB"), stock, fused):
        assert f.dtype == s.dtype and f.shape == s.shape, name
        assert rel_err(f, s) < TOLERANCE[dtype], name


def test_base_bias_is_added():
    layer = make_lora_nf4_linear(64, 128, dtype=torch.float32, bias=True)
    x, grad_out = torch.randn(5, 128), torch.randn(5, 64)
    stock, fused = stock_and_fused(layer, x, grad_out)
    assert all(rel_err(f, s) < 1e-5 for s, f in zip(stock, fused))


def test_fp32_input_with_bf16_compute_dtype_returns_fp32():
    layer = make_lora_nf4_linear(64, 128, dtype=torch.bfloat16)
    x, grad_out = torch.randn(3, 128), torch.randn(3, 64)
    stock, fused = stock_and_fused(layer, x, grad_out)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.float32
    assert all(rel_err(f, s) < TOLERANCE[torch.bfloat16] for s, f in zip(stock, fused))


def test_no_input_grad_when_input_is_frozen():
    layer = make_lora_nf4_linear(64, 128, dtype=torch.float32)
    patch_model(layer, verbose=False)
    layer(torch.randn(3, 128)).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_saves_no_dequantized_weight():
    layer = make_lora_nf4_linear(192, 256, r=4, dtype=torch.float32)
    patch_model(layer, verbose=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(torch.randn(3, 256, requires_grad=True))
    assert (192, 256) not in saved and (256, 192) not in saved

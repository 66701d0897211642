"""With gradients off (a checkpoint's first pass), the Functions run their forward alone: the same
outputs as with autograd recording, and no graph."""

import pytest
import torch

from qlora_fast import patch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.ops.forward_only import apply


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.seen = True
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_apply_records_a_graph_only_with_gradients_on():
    x = torch.randn(3, requires_grad=True)
    assert type(apply(_Double, x).grad_fn).__name__ == "_DoubleBackward"
    with torch.no_grad():
        y = apply(_Double, x)
    assert y.grad_fn is None and not y.requires_grad and torch.equal(y, x * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_layer_outputs_match_with_and_without_gradients(dtype):
    model = add_lora(quantize_to_nf4_(random_causal_lm("tiny-llama", dtype), compute_dtype=dtype),
                     init_b_std=0.02).train()
    report = patch_model(model)
    assert report.mlps and report.qkv and report.rms_norms
    layer = model.base_model.model.model.layers[0]
    x = torch.randn(2, 9, 64, dtype=dtype)
    position = torch.arange(9)[None]
    rotary = model.base_model.model.model.rotary_emb(x, position)
    with_grad = layer(x.requires_grad_(True), position_embeddings=rotary)
    with torch.no_grad():
        without = layer(x, position_embeddings=rotary)
    with_grad = with_grad[0] if isinstance(with_grad, tuple) else with_grad
    without = without[0] if isinstance(without, tuple) else without
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_grad.detach(), without)

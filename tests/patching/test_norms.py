"""patching/norms.py: RMSNorms on the kernel and the residual adds inside them."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.patching import core, norms
from qlora_fast.ops.unread_sum import unread_sum
from tests.helpers import loss_and_grads, patched_keeps_loss_and_grads, tiny_qlora


# 2 layers x 2 + the final norm; Qwen3's and Gemma-3's q/k norms; Gemma-2/3's four norms per layer
@pytest.mark.parametrize("shape,norms", [("tiny-llama", 5), ("tiny-qwen2", 5), ("tiny-mistral", 5),
                                         ("tiny-qwen3", 9), ("tiny-gemma", 5), ("tiny-gemma2", 9),
                                         ("tiny-gemma3", 13)])
def test_rms_norm_option_keeps_loss_and_grads(shape, norms):
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 16))
    report = patched_keeps_loss_and_grads(model, ids, rms_norm=True)
    assert report.rms_norms == norms and f"{norms} RMSNorms" in report.summary()
    unpatch_model(model)
    assert not any("forward" in vars(m) for m in model.modules())


def _checkpointed_bf16_qlora(shape):
    model = tiny_qlora(shape, dtype=torch.bfloat16).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    return model


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("offload_checkpoints", [True, False])
def test_add_norm_layers_give_the_same_bf16_loss_and_grads_bit_for_bit(shape, offload_checkpoints):
    model = _checkpointed_bf16_qlora(shape)
    ids = torch.randint(0, 512, (2, 24))
    assert patch_model(model, add_norm=False, offload_checkpoints=offload_checkpoints).add_norms == 0
    separate_loss, separate_grads = loss_and_grads(model, ids)
    unpatch_model(model)
    report = patch_model(model, offload_checkpoints=offload_checkpoints)
    assert report.add_norms == 2 and "2 decoder layers' with the residual add" in report.summary()
    loss, grads = loss_and_grads(model, ids)
    assert loss == separate_loss and grads.keys() == separate_grads.keys()
    assert all(torch.equal(grads[n], separate_grads[n]) for n in grads)
    unpatch_model(model)
    assert not any("forward" in vars(m) or vars(m).get(core.OUTPUT_UNREAD_IN_RECOMPUTE)
                   for m in model.modules())


def test_recompute_leaves_the_layer_output_uncomputed(monkeypatch):
    model = _checkpointed_bf16_qlora("tiny-llama")
    patch_model(model, offload_checkpoints=True)
    sums = []
    monkeypatch.setattr(norms, "unread_sum", lambda a, b: sums.append(a.shape) or unread_sum(a, b))
    loss_and_grads(model, torch.randint(0, 512, (2, 24)))
    assert sums == [(2, 24, 64)] * 2  # each layer's recompute; its first pass adds


def test_add_norm_needs_the_norm_kernel_and_hook_free_norms():
    model = tiny_qlora()
    assert patch_model(model, rms_norm=False).add_norms == 0
    unpatch_model(model)
    model.base_model.model.model.layers[0].input_layernorm.register_forward_hook(lambda *args: None)
    assert patch_model(model).add_norms == 1


def test_gemma_norms_with_llama_arithmetic_fail_the_comparison(monkeypatch):
    """The model-level check can fail: Gemma's norms computed as Llama's (w, not 1 + w) are caught."""
    model = tiny_qlora("tiny-gemma").train()
    ids = torch.randint(0, 512, (2, 16))
    stock = loss_and_grads(model, ids)
    monkeypatch.setattr(norms, "gemma_rms_norm_forward", lambda self, x: norms.rms_norm_op(x, self.weight, self.eps))
    patch_model(model)
    patched = loss_and_grads(model, ids)
    assert abs(patched[0] - stock[0]) > 1e-3


def test_norms_unfrozen_after_patching_get_their_gradient():
    model = tiny_qlora().train()
    patch_model(model, verbose=False)
    norm = model.base_model.model.model.layers[0].input_layernorm
    norm.weight.requires_grad_(True)
    ids = torch.randint(0, 512, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_add_norm_only_on_the_transformers_it_reproduces(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")  # decoder layers of another signature
    report = patch_model(tiny_qlora(), verbose=False)
    assert report.add_norms == 0 and report.rms_norms == 5

"""patching/qkv.py: an attention's q, k and v projections as one Function."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from tests.helpers import patched_keeps_loss_and_grads, tiny_qlora


def _qkv_grad_fns(model, ids, projections=("k_proj", "v_proj")):
    """The grad_fn names of every output of these projections in one forward."""
    names, handles = [], []
    for name, module in model.named_modules():
        if name.endswith(projections):
            handles.append(module.register_forward_hook(lambda m, i, out: names.append(type(out.grad_fn).__name__)))
    try:
        model(input_ids=ids, labels=ids)
    finally:
        for handle in handles:
            handle.remove()
    return names


def test_qwen2_qkv_bias_is_patched():
    model = tiny_qlora("tiny-qwen2")
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    assert patch_model(model).patched == 14


# Qwen3 normalizes q and k right after their projections
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma"])
def test_qkv_projections_run_as_one_function(shape):  # Qwen2's q/k/v carry a frozen base bias
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 24))
    assert patched_keeps_loss_and_grads(model, ids).qkv == 2
    assert not any("_qlora_fast_stashed_output" in vars(m) for m in model.modules())  # every k, v taken
    assert set(_qkv_grad_fns(model, ids, ("q_proj",))) == {"LoRANF4QKVFunctionBackward"}
    # with a hook on k_proj / v_proj (which would then see their call, not the fused one) each goes alone
    assert set(_qkv_grad_fns(model, ids)) == {"LoRANF4LinearFunctionBackward"}
    unpatch_model(model)
    assert not any("_qlora_fast_kv_siblings" in vars(m) for m in model.modules())


def test_qkv_with_trainable_base_bias_or_dropout_takes_three_layers():
    model = tiny_qlora("tiny-qwen2")
    model.base_model.model.model.layers[0].self_attn.k_proj.base_layer.bias.requires_grad_(True)
    assert patch_model(model).qkv == 1
    model = tiny_qlora(lora_dropout=0.1).train()
    patch_model(model)
    ids = torch.randint(0, 512, (1, 16))
    assert set(_qkv_grad_fns(model, ids)) == {"LoRANF4LinearFunctionBackward"}
    assert not any("_qlora_fast_stashed_output" in vars(m) for m in model.modules())

"""patching/rotary.py: the rotary embedding through the kernel, routed and restored."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.ops.rope import RoPEFunction
from tests.helpers import loss_and_grads, patched_keeps_loss_and_grads, tiny_qlora


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"])
def test_rope_option_keeps_loss_and_grads(shape):
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 16))
    assert patched_keeps_loss_and_grads(model, ids, rope=True).rope


def test_rotary_embeddings_are_routed_and_restored():
    import transformers.models.llama.modeling_llama as modeling

    stock = modeling.apply_rotary_pos_emb
    model = tiny_qlora().train()
    report = patch_model(model)  # on by default
    assert report.rope and "rotary embeddings" in report.summary()
    assert modeling.apply_rotary_pos_emb.qlora_fast_stock is stock
    calls = []
    original = RoPEFunction.apply
    RoPEFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        loss_and_grads(model, torch.randint(0, 512, (1, 8)))
    finally:
        RoPEFunction.apply = original
    assert len(calls) == 2  # one per decoder layer
    unpatch_model(model)
    assert modeling.apply_rotary_pos_emb is stock
    assert patch_model(model, rope=False).rope is False and modeling.apply_rotary_pos_emb is stock

"""patching/rotary.py: the rotary embedding through the kernel, routed and restored."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.ops import lora_nf4_qkv
from qlora_fast.ops.rope import RoPEFunction
from qlora_fast.patching import norms
from qlora_fast.patching.core import ATTENTION_INPUTS
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
        assert not calls  # q and k came rotated from the fused q/k/v
        unpatch_model(model)
        patch_model(model, fused_qkv=False)
        loss_and_grads(model, torch.randint(0, 512, (1, 8)))
    finally:
        RoPEFunction.apply = original
    assert len(calls) == 2  # one per decoder layer
    unpatch_model(model)
    assert modeling.apply_rotary_pos_emb is stock
    assert patch_model(model, rope=False).rope is False and modeling.apply_rotary_pos_emb is stock


def _checkpointed_bf16(shape):
    model = tiny_qlora(shape, torch.bfloat16).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    return model


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])  # Qwen2: q/k/v with a base bias
@pytest.mark.parametrize("mutant", [False, True], ids=["rotated inside", "mutant: k's term dropped"])
def test_q_and_k_rotated_inside_the_fused_qkv_change_no_bit(shape, mutant, monkeypatch):
    """The decoder layer offers RoPE to the fused q/k/v, which returns q and k rotated, and the drop-in
    passes them through: the bf16 loss and every gradient bit for bit as with RoPE after the Function
    (checkpointed: the recompute rotates again). The mutant drops k's LoRA term: that must show."""
    model = _checkpointed_bf16(shape)
    ids = torch.randint(0, 512, (2, 24))
    patch_model(model, verbose=False)
    with monkeypatch.context() as apart:  # the reference: no offer, RoPE after the Function
        apart.setattr(norms, "_rotary_offer", lambda *args: None)
        reference = loss_and_grads(model, ids)
    rotated, rope = [], lora_nf4_qkv.rope_plus_low_rank
    monkeypatch.setattr(lora_nf4_qkv, "rope_plus_low_rank", lambda y, q_term, k_term, *args: rotated.append(1) or rope(
        y, q_term, k_term._replace(scale=0.0) if mutant else k_term, *args))
    loss, grads = loss_and_grads(model, ids)
    assert len(rotated) == 2 * 2  # 2 layers, first pass and recompute
    same = loss == reference[0] and all(torch.equal(grads[n], reference[1][n]) for n in grads)
    assert same != mutant


def test_a_hook_on_q_proj_keeps_rope_after_the_projections():
    """A forward hook on q_proj could read or replace q before RoPE: no rotation inside the Function then."""
    model = tiny_qlora().train()
    patch_model(model, verbose=False)
    seen = []
    handle = model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: seen.append(output.shape))
    calls, original = [], RoPEFunction.apply
    RoPEFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        loss_and_grads(model, torch.randint(0, 512, (1, 8)))
    finally:
        RoPEFunction.apply = original
        handle.remove()
    assert seen and len(calls) == 1  # layer 0 after its projections, layer 1 inside its fused q/k/v
    unpatch_model(model)


def test_q_changed_on_its_way_to_rope_is_an_error():
    """q and k the fused q/k/v rotated must reach the drop-in as they left; anything else, or no call at all,
    is a clear error rather than q rotated twice or not at all."""
    import transformers.models.llama.modeling_llama as modeling

    model = tiny_qlora().train()
    patch_model(model, verbose=False)
    q, k = torch.randn(1, 8, 4 * 32), torch.randn(1, 8, 2 * 32)
    cos, sin = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    heads = lambda t: t.view(1, 8, -1, 32).transpose(1, 2)
    ATTENTION_INPUTS.rotary, ATTENTION_INPUTS.rotated = (cos, sin), (q, k)
    try:
        assert modeling.apply_rotary_pos_emb(heads(q), heads(k), cos, sin)[0].data_ptr() == q.data_ptr()
        assert ATTENTION_INPUTS.rotated is None  # passed through once
        ATTENTION_INPUTS.rotated = (q, k)
        with pytest.raises(RuntimeError, match="changed q or k between its projections and RoPE"):
            modeling.apply_rotary_pos_emb(heads(q) * 2, heads(k), cos, sin)
    finally:
        ATTENTION_INPUTS.rotary = ATTENTION_INPUTS.rotated = None
    forward = modeling.LlamaAttention.forward
    try:  # an attention that skips RoPE (no such vouched class exists: the table would be wrong)
        modeling.LlamaAttention.forward = lambda self, hidden_states, *args, **kwargs: (
            self.o_proj(torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states)], -1)[..., :128]), None)
        with pytest.raises(RuntimeError, match="did not apply RoPE"):
            model(input_ids=torch.randint(0, 512, (1, 8)))
    finally:
        modeling.LlamaAttention.forward = forward
    unpatch_model(model)

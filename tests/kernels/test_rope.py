import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from qlora_fast.ops.rope import RoPEFunction, fused_rope_applies


def inputs(dtype, batch=2, q_heads=4, k_heads=2, seq=37, head_dim=16):
    """q and k as attention makes them: (batch, seq, heads, dim) projections transposed to (b, h, s, d)."""
    q = torch.randn(batch, seq, q_heads, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, k_heads, head_dim).to(dtype).transpose(1, 2)
    angles = torch.arange(seq)[:, None] * torch.rand(head_dim // 2)[None, :] * 3
    angles = torch.cat([angles, angles], dim=-1).expand(batch, seq, head_dim)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


def grads(fn, q, k, cos, sin, dq_out, dk_out):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_embed, k_embed = fn(q, k, cos, sin)
    torch.autograd.backward([q_embed, k_embed], [dq_out, dk_out])
    return q_embed.detach(), k_embed.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_heads,k_heads,seq", [(4, 2, 37), (3, 1, 5), (8, 8, 300)])  # GQA, odd heads, long
@pytest.mark.parametrize("head_dim", [16, 24])  # half a head a power of two, and padded to one (12 -> 16)
def test_matches_transformers(dtype, q_heads, k_heads, seq, head_dim):
    q, k, cos, sin = inputs(dtype, q_heads=q_heads, k_heads=k_heads, seq=seq, head_dim=head_dim)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    ref = grads(apply_rotary_pos_emb, q, k, cos, sin, dq_out, dk_out)
    ours = grads(RoPEFunction.apply, q, k, cos, sin, dq_out, dk_out)
    assert ours[0].stride() == ref[0].stride()  # attention's layout kept
    for name, r, o in zip(("q", "k", "dq", "dk"), ref, ours):
        assert o.dtype == r.dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(o, r, msg=name)
        else:  # the same products rounded at the same points: bit-exact
            assert torch.equal(o, r), name


def test_applies_only_where_exact():
    q, k, cos, sin = inputs(torch.bfloat16)
    assert fused_rope_applies(q, k, cos, sin)
    assert not fused_rope_applies(q, k, cos.float(), sin.float())  # torch would promote to fp32
    assert not fused_rope_applies(q, k, cos, sin, unsqueeze_dim=2)
    assert not fused_rope_applies(q, k, cos[..., :8], sin[..., :8])  # partial rotary (Phi-3's rotary_dim)
    assert not fused_rope_applies(q, k, cos.requires_grad_(True), sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_phi3_rotating_whole_heads(dtype):
    """Phi-3's apply_rotary_pos_emb (partial rotary in general) rotating whole 96-wide heads, as
    Phi-3.5-mini's does: half a head is 48, padded to 64 in the kernel."""
    q, k, cos, sin = inputs(dtype, q_heads=3, k_heads=3, seq=19, head_dim=96)
    assert fused_rope_applies(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    ref = grads(phi3_apply_rotary_pos_emb, q, k, cos, sin, dq_out, dk_out)
    ours = grads(RoPEFunction.apply, q, k, cos, sin, dq_out, dk_out)
    for name, r, o in zip(("q", "k", "dq", "dk"), ref, ours):
        if dtype == torch.float32:
            torch.testing.assert_close(o, r, msg=name)
        else:
            assert torch.equal(o, r), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_positions_shared_by_the_batch(dtype):
    """Without position_ids transformers makes cos and sin of batch 1 for a batch of any size."""
    q, k, cos, sin = inputs(dtype, batch=3)
    cos, sin = cos[:1].contiguous(), sin[:1].contiguous()
    assert fused_rope_applies(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    ref = grads(apply_rotary_pos_emb, q, k, cos, sin, dq_out, dk_out)
    ours = grads(RoPEFunction.apply, q, k, cos, sin, dq_out, dk_out)
    assert all(torch.equal(o, r) for o, r in zip(ours, ref))


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_fp32_q_written_narrower_is_the_fp32_result_rounded_once(narrow):
    """fp32 q and k (a prepared model) written in the dtype attention rounds them to: the fp32 rotation
    rounded once; the bf16 output gradients give the fp32 gradients of their fp32 copies."""
    q, k, cos, sin = inputs(torch.float32, seq=37)
    dq_out, dk_out = torch.randn_like(q).to(narrow), torch.randn_like(k).to(narrow)
    wide = grads(RoPEFunction.apply, q, k, cos, sin, dq_out.float(), dk_out.float())
    narrowed = grads(lambda *a: RoPEFunction.apply(*a, narrow), q, k, cos, sin, dq_out, dk_out)
    for name, w, n in zip(("q", "k"), wide[:2], narrowed[:2]):
        assert n.dtype == narrow and torch.equal(n, w.to(narrow)), name
    for name, w, n in zip(("dq", "dk"), wide[2:], narrowed[2:]):
        assert n.dtype == torch.float32 and torch.equal(n, w), name
    # products rounded in the narrow dtype instead (rotating q rounded first) must show
    mutant = RoPEFunction.apply(q.to(narrow), k.to(narrow), cos.to(narrow), sin.to(narrow))
    assert not torch.equal(mutant[0], narrowed[0])

"""The fused q/k/v projections against three stock peft LoRA layers on the same weights."""

import pytest
import torch

from qlora_fast.nf4 import cached_nf4_weight
from qlora_fast.ops.lora_nf4_qkv import lora_nf4_qkv
from qlora_fast.testing import make_lora_nf4_linear
from tests.helpers import rel_err, same_up_to_fp32_sum_order

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# GQA-like q, k, v shapes: different ranks and scalings, or one rank and scaling as peft usually gives
SHAPES = {"mixed": ((96, 8, 16), (40, 4, 4), (40, 8, 32)), "uniform": ((96, 8, 16), (40, 8, 16), (40, 8, 16))}


def projections(dtype, shapes="mixed"):
    """q, k, v layers (in_features a multiple of 64, as bitsandbytes' CPU matmul, the reference here, needs)."""
    return [make_lora_nf4_linear(out, 128, r=r, lora_alpha=alpha, dtype=dtype) for out, r, alpha in SHAPES[shapes]]


def run(fn, layers, x, grads_out):
    x = x.detach().clone().requires_grad_(True)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    outs = fn(x)
    torch.autograd.backward(outs, grads_out)
    adapters = [p.grad for layer in layers for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    return [o.detach() for o in outs], x.grad, adapters


def fused(layers, **options):
    def fn(x):
        args = [(l.lora_A["default"].weight, l.lora_B["default"].weight, l.scaling["default"],
                 cached_nf4_weight(l.base_layer.weight)) for l in layers]
        return lora_nf4_qkv(x, *args, **options)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", list(SHAPES))
def test_matches_three_peft_layers(dtype, shapes):
    layers = projections(dtype, shapes)
    x = torch.randn(3, 7, 128, dtype=dtype)
    grads_out = [torch.randn(3, 7, layer.out_features, dtype=dtype) for layer in layers]
    ref_outs, ref_dx, ref_adapters = run(lambda x: [layer(x) for layer in layers], layers, x, grads_out)
    outs, dx, adapters = run(fused(layers), layers, x, grads_out)
    for o, r in zip(outs, ref_outs):
        assert o.shape == r.shape and o.dtype == r.dtype and rel_err(o, r) < TOLERANCE[dtype]
    assert rel_err(dx, ref_dx) < TOLERANCE[dtype]
    for g, r in zip(adapters, ref_adapters):
        assert g.dtype == r.dtype == torch.float32 and rel_err(g, r) < TOLERANCE[dtype]


def test_an_unused_output_gets_no_gradient_trouble():
    """Attention may leave an output out of the loss (a frozen value path, say): its gradient is zero."""
    layers = projections(torch.float32)
    x = torch.randn(2, 5, 128)
    q, k, v = fused(layers)(x.requires_grad_(True))
    (q.sum() + k.sum()).backward()
    assert torch.all(layers[2].lora_A["default"].weight.grad == 0) and x.grad is not None


def fused_wide(layers, v_dtype=None):
    """The fused Function on a narrowed (bf16) x whose stock dtype is fp32: q, k fp32, v in v_dtype."""
    return fused(layers, compute_dtype=torch.bfloat16, out_dtype=torch.float32, v_dtype=v_dtype)


def test_wide_outputs_and_their_gradients_round_as_stock_sums_and_casts():
    """bf16 x handed on narrowed from fp32: q, k, v are fp32 base + term sums (v written in bf16 where asked:
    the same sums rounded once); their fp32 (or mixed) output gradients, gathered and rounded to bf16 in one
    pass each, give bit for bit what the same gradients rounded to bf16 first give on the bf16 outputs."""
    layers = projections(torch.bfloat16)
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16)
    grads_out = [torch.randn(3, 7, layer.out_features) for layer in layers]
    bf16_outs, bf16_dx, bf16_adapters = run(fused(layers), layers, x, [g.bfloat16() for g in grads_out])
    wide = run(fused_wide(layers), layers, x, grads_out)
    narrow_v = run(fused_wide(layers, torch.bfloat16), layers, x, grads_out[:2] + [grads_out[2].bfloat16()])
    assert [o.dtype for o in wide[0]] == [torch.float32] * 3
    assert all(torch.equal(o.bfloat16(), b) for o, b in zip(wide[0], bf16_outs))
    assert not torch.equal(wide[0][0], bf16_outs[0].float())  # unrounded sums
    assert narrow_v[0][2].dtype == torch.bfloat16 and torch.equal(narrow_v[0][2], bf16_outs[2])
    for other in (wide, narrow_v):
        assert torch.equal(other[1], bf16_dx)
        assert all(torch.equal(g, r) for g, r in zip(other[2], bf16_adapters))


HEAD_DIM = 32  # the rotated path's smallest: the kernel's term product needs half a head of >= 16 columns


def rotary_inputs(dtype, batch=3, seq=7, shared_positions=False, head_dim=HEAD_DIM):
    """cos and sin as a Llama rotary embedding makes them, (batch or 1, seq, head_dim) in `dtype`."""
    angles = torch.arange(seq)[:, None] * torch.rand(head_dim // 2)[None, :] * 3
    angles = torch.cat([angles, angles], -1).expand(1 if shared_positions else batch, seq, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotated_after(fn, cos, sin, out_dtype):
    """fn's q, k, v with q and k then rotated by transformers' apply_rotary_pos_emb, as attention does."""
    from transformers.models.llama import modeling_llama

    # transformers' own, also where a patched model in this process left the drop-in in its place
    apply_rotary_pos_emb = getattr(modeling_llama.apply_rotary_pos_emb, "qlora_fast_stock",
                                   modeling_llama.apply_rotary_pos_emb)

    def rotated(x):
        q, k, v = fn(x)
        heads = lambda t: t.view(*t.shape[:2], -1, cos.shape[-1]).transpose(1, 2)
        flat = lambda t: t.transpose(1, 2).reshape(*t.shape[:1], t.shape[2], -1)
        q, k = apply_rotary_pos_emb(heads(q), heads(k), cos, sin)
        return flat(q.to(out_dtype)), flat(k.to(out_dtype)), v
    return rotated


# (stock q dtype of x, compute dtype, dtype attention takes q and k in): a bf16 / fp16 / fp32 model, and
# a prepared one (bf16 x narrowed from fp32, fp32 q and k written in bf16)
ROTARY_CASES = {"bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                "fp16": (torch.float16, torch.float16, torch.float16),
                "fp32": (torch.float32, torch.float32, torch.float32),
                "prepared": (torch.float32, torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("case", list(ROTARY_CASES))
@pytest.mark.parametrize("shared_positions,head_dim", [(False, HEAD_DIM), (True, HEAD_DIM), (False, 48)])
def test_rotated_q_and_k_are_the_unrotated_path_then_rope(case, shared_positions, head_dim):
    """q and k rotated inside the Function: bit for bit the unrotated Function's outputs rotated by
    transformers (products and sums rounded where torch rounds them), gradients included; and within
    tolerance of stock peft's layers rotated the same way. 48-wide heads: half a head (24) is padded to 32
    in the kernel, as Phi-3.5's 96-wide ones are."""
    from qlora_fast.ops.lora_nf4_qkv import Rotary

    q_dtype, compute, attention_dtype = ROTARY_CASES[case]
    layers = [make_lora_nf4_linear(out, 128, r=8, lora_alpha=alpha, dtype=compute)
              for out, alpha in ((4 * head_dim, 16), (2 * head_dim, 32), (2 * head_dim, 16))]
    x = torch.randn(3, 7, 128, dtype=compute)
    cos, sin = rotary_inputs(q_dtype, shared_positions=shared_positions, head_dim=head_dim)
    grads_out = [torch.randn(3, 7, layer.out_features, dtype=attention_dtype) for layer in layers]
    wide = dict(compute_dtype=compute, out_dtype=q_dtype, v_dtype=attention_dtype)
    reference = run(rotated_after(fused(layers, **wide), cos, sin, attention_dtype), layers, x, grads_out)
    ours = run(fused(layers, **wide, rotary=Rotary(cos, sin, attention_dtype)), layers, x, grads_out)
    assert all(same_up_to_fp32_sum_order(o, r) for o, r in zip(ours[0], reference[0]))
    assert same_up_to_fp32_sum_order(ours[1], reference[1])
    assert all(same_up_to_fp32_sum_order(g, r) for g, r in zip(ours[2], reference[2]))
    stock = run(rotated_after(lambda x: [layer(x.to(q_dtype)) for layer in layers], cos, sin, attention_dtype),
                layers, x, grads_out)
    tolerance = TOLERANCE[compute]
    assert all(rel_err(o, r) < tolerance for o, r in zip(ours[0], stock[0]))
    assert all(rel_err(g, r) < tolerance for g, r in zip(ours[2], stock[2]))

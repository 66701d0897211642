"""The q, k and v projections of one attention layer, each an NF4 weight plus LoRA, in one autograd Function.

The three weights are dequantized by one launch into one stacked (q_out + k_out + v_out, hidden) buffer
(the weights must be `stackable`: patch.py checks), so one GEMM
gives [q | k | v] and one more gives x @ [A_q; A_k; A_v]^T (the six adapters cast by one launch,
ops/adapters.py); each LoRA term is added in place into its column block (kernels/low_rank_add.py).
Backward mirrors it: one GEMM for dX through the stacked weight, one pass adds the three LoRA terms to
it, and with one scaling one GEMM gives the three A gradients. Against three LoRA layers that is fewer
launches and one Function instead of three, which is what batches of a few thousand tokens are bound
by. Saves x, x @ A^T and the compute-dtype adapters; never a dequantized weight.

Base biases (Qwen2's q/k/v) are cast in the same launch as the adapters, into the same buffer, where the
three lie end to end: the stacked bias is a view, added inside the GEMM (rounded once, as bitsandbytes'
F.linear adds it). Where x is wider than the compute dtype the outputs are x's dtype, base + term
unrounded, as stock peft sums them (ops/adapters.py); so they are where `out_dtype` is wider (x was handed
on narrowed, its stock dtype that one: patching/norms.py). With `keep_output`, the stacked base output of an
offloaded checkpoint's first pass is kept for its recompute, as in ops/lora_nf4_linear.py.

With `rotary`, q and k come out already rotated by the attention's RoPE (kernels/rope.py adds their LoRA
terms and rotates in one pass, in the dtype the attention takes them in) and the attention passes them
through its apply_rotary_pos_emb unchanged (patching/rotary.py); backward rotates their gradients back
straight into the q and k columns of the gathered output gradient.
"""

from typing import NamedTuple

import torch

from ..kernels.low_rank import LowRank
from ..kernels.nf4_dequantize import nf4_dequantize_stacked
from ..kernels.rope import rope_backward, rope_plus_low_rank
from .adapters import adapters_in, plus_low_rank_terms, stacked_rows
from .forward_only import apply
from .lora_grads import add_shared_input_terms_, products_side_by_side, scaled_mm, shared_input_a_grads
from .offloaded_checkpoint import kept_or_computed


class Rotary(NamedTuple):
    """RoPE applied to q and k inside the Function: the attention's cos and sin, (batch or 1, seq, head_dim)
    in q's stock dtype, and the dtype rotated q and k are written in (narrower only for fp32 q)."""

    cos: torch.Tensor
    sin: torch.Tensor
    out_dtype: torch.dtype


class LoRANF4QKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a_q, b_q, a_k, b_k, a_v, b_v, weights, scalings, compute_dtype, biases=None,
                keep_output=False, out_dtype=None, v_dtype=None, rotary=None):
        out_dtype = out_dtype or x.dtype
        dtypes = (out_dtype, out_dtype, v_dtype or out_dtype)
        lora_a, lora_b = (a_q, a_k, a_v), (b_q, b_k, b_v)
        ctx.lora_dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_a, lora_b)]
        ctx.out_features = [w.shape[0] for w in weights]
        ctx.ranks = [a.shape[0] for a in lora_a]
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        *a_each, b_q, b_k, b_v = adapters_in(compute_dtype, *lora_a, *lora_b, *(biases or ()))[:6]
        a_all, b_all = stacked_rows(a_each), (b_q, b_k, b_v)
        bias = None
        if biases:  # the three copies lie end to end after b_v in adapters_in's buffer
            bias = b_v.as_strided((sum(ctx.out_features),), (1,), b_v.storage_offset() + b_v.numel())

        base = lambda: torch.nn.functional.linear(x2, nf4_dequantize_stacked(weights, compute_dtype), bias)
        y = kept_or_computed(weights[0], base) if keep_output else base()
        xa = x2 @ a_all.t()
        terms = [LowRank(xa_i, b_i, s_i) for xa_i, b_i, s_i in zip(xa.split(ctx.ranks, 1), b_all, scalings)]
        blocks = list(zip(y.split(ctx.out_features, 1), terms))
        ctx.rotated = rotary is not None
        if rotary is not None:
            outputs = _rotated_q_k(y, terms, rotary, x.shape[1], out_dtype, keep_output, ctx.out_features)
            dtypes = (rotary.out_dtype, rotary.out_dtype, dtypes[2])
            outputs += (plus_low_rank_terms(blocks[2][0], blocks[2:], dtypes[2], fresh=keep_output),)
        elif dtypes[2] == out_dtype:
            outputs = plus_low_rank_terms(y, blocks, out_dtype, fresh=keep_output).split(ctx.out_features, 1)
        else:  # q and k in out_dtype, v in its own
            qk_width = ctx.out_features[0] + ctx.out_features[1]
            q_k = plus_low_rank_terms(y[:, :qk_width], blocks[:2], out_dtype, fresh=keep_output)
            v = plus_low_rank_terms(blocks[2][0], blocks[2:], dtypes[2], fresh=keep_output)
            outputs = (*q_k.split(ctx.out_features[:2], 1), v)

        ctx.save_for_backward(x2, xa, a_all, *b_all, *(rotary[:2] if rotary else ()))
        ctx.q_dtype = out_dtype
        ctx.weights, ctx.scalings = weights, scalings
        ctx.x_meta = (x.shape, x.dtype)
        lead = x.shape[:-1]
        return tuple(y_i.view(*lead, n).to(dtype) for y_i, n, dtype in zip(outputs, ctx.out_features, dtypes))

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        saved = ctx.saved_tensors  # unpacked once: torch's checkpointing refuses a second unpack
        x2, xa, a_all, *b_all = saved[:6]
        grads = [g.reshape(-1, n) for g, n in zip((grad_q, grad_k, grad_v), ctx.out_features)]
        if ctx.rotated:  # cos and sin saved after the B's
            dy = _unrotated_gradients(grads, *saved[6:], ctx.x_meta[0][:2], ctx.q_dtype, x2.dtype)
        elif all(g.dtype == x2.dtype for g in grads):
            dy = torch.cat(grads, 1)
        else:  # wider gradients (a prepared model's fp32 q and k) rounded as they are gathered: one pass each
            dy = torch.empty(grads[0].shape[0], sum(ctx.out_features), dtype=x2.dtype, device=x2.device)
            for block, grad in zip(dy.split(ctx.out_features, 1), grads):
                block.copy_(grad)
        # [dy_q @ B_q | dy_k @ B_k | dy_v @ B_v] side by side: one GEMM for the three A gradients (with one
        # scaling) and one pass for the three LoRA terms of dX
        dy_b = products_side_by_side(dy.split(ctx.out_features, 1), b_all)
        grads_a = shared_input_a_grads(dy_b, x2, ctx.ranks, ctx.scalings, [d[0] for d in ctx.lora_dtypes])
        grads_b = [scaled_mm(dy_i.t(), xa_i, s_i, dtypes[1]) for dy_i, xa_i, s_i, dtypes in
                   zip(dy.split(ctx.out_features, 1), xa.split(ctx.ranks, 1), ctx.scalings, ctx.lora_dtypes)]

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = add_shared_input_terms_(dy @ nf4_dequantize_stacked(ctx.weights, dy.dtype), dy_b, a_all,
                                             ctx.ranks, ctx.scalings)
            grad_x = grad_x.view(ctx.x_meta[0]).to(ctx.x_meta[1])
        adapter_grads = [g for pair in zip(grads_a, grads_b) for g in pair]
        return (grad_x, *adapter_grads, None, None, None, None, None, None, None, None)


def _heads(t: torch.Tensor, lead, head_dim: int) -> torch.Tensor:
    """A (tokens, heads * head_dim) block as attention views it: (batch, heads, seq, head_dim)."""
    return t.view(*lead, -1, head_dim).transpose(1, 2)


def _rotated_q_k(y, terms, rotary: Rotary, seq_len: int, q_dtype, fresh: bool, widths):
    """q and k: RoPE of base + term from y's q and k blocks, in rotary.out_dtype; written over those blocks
    of y where that dtype is y's and y is not kept (`fresh`)."""
    qk_width = widths[0] + widths[1]
    y_qk = y[:, :qk_width]
    if rotary.out_dtype == y.dtype and not fresh:
        out = y_qk
    else:
        out = torch.empty(y.shape[0], qk_width, dtype=rotary.out_dtype, device=y.device)
    rope_plus_low_rank(y_qk, terms[0], terms[1], rotary.cos, rotary.sin, seq_len, out, q_dtype)
    return tuple(out.split(widths[:2], 1))


def _unrotated_gradients(grads, cos, sin, lead, q_dtype, dtype):
    """The (tokens, q + k + v) output gradient before RoPE in `dtype`: q's and k's rotated back into their
    blocks (rounded once, from fp32 products where stock's q was fp32), v's copied."""
    head_dim = cos.shape[-1]
    dy = torch.empty(grads[0].shape[0], sum(g.shape[1] for g in grads), dtype=dtype, device=grads[0].device)
    blocks = dy.split([g.shape[1] for g in grads], 1)
    rope_backward(_heads(grads[0], lead, head_dim), _heads(grads[1], lead, head_dim), cos, sin,
                  outs=(_heads(blocks[0], lead, head_dim), _heads(blocks[1], lead, head_dim)),
                  wide_inputs=q_dtype == torch.float32)
    blocks[2].copy_(grads[2])
    return dy


def lora_nf4_qkv(x, q, k, v, compute_dtype=None, biases=None, keep_output: bool = False, out_dtype=None,
                 v_dtype=None, rotary: Rotary | None = None):
    """Autograd entry point: (q, k, v) outputs. q, k and v are (lora_a, lora_b, scaling, NF4Weight) of each
    projection; `biases`, the three frozen base biases or None; `compute_dtype` and `out_dtype` (the
    outputs' dtype) default to x's dtype, `v_dtype` (v's, where it differs: base + term rounded once) to
    out_dtype. With `rotary` (x of shape (batch, seq, hidden); q's and k's adapters of one rank), q and k
    are returned rotated, in rotary.out_dtype."""
    (a_q, b_q, s_q, w_q), (a_k, b_k, s_k, w_k), (a_v, b_v, s_v, w_v) = q, k, v
    return apply(LoRANF4QKVFunction, x, a_q, b_q, a_k, b_k, a_v, b_v, (w_q, w_k, w_v), (s_q, s_k, s_v),
                 compute_dtype or x.dtype, biases, keep_output, out_dtype, v_dtype, rotary)

"""Autograd Function over the rotary-embedding kernel, and the drop-in for transformers'
`apply_rotary_pos_emb` that routes to it when it can."""

import torch

from ..kernels.rope import rope_backward, rope_forward


class RoPEFunction(torch.autograd.Function):
    """q and k rotated, in `out_dtype` (default q's); their gradients in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, out_dtype=None):
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = q.dtype
        return rope_forward(q, k, cos, sin, out_dtype)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = rope_backward(grad_q, grad_k, cos, sin, out_dtype=ctx.in_dtype)
        return dq, dk, None, None, None


def fused_rope_applies(q, k, cos, sin, unsqueeze_dim=1) -> bool:
    """The shapes and dtypes the kernel serves exactly: one dtype throughout (else torch would promote),
    4-D q and k, 3-D cos/sin broadcast over heads (and over the batch when theirs is 1) rotating whole heads
    (not Phi-3's partial rotary), an even head_dim, no gradient into cos/sin."""
    head_dim = q.shape[-1]
    return (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
            and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.shape == sin.shape
            and cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == (q.shape[2], head_dim)
            and k.shape[0] == q.shape[0]
            and k.shape[2:] == q.shape[2:] and head_dim % 2 == 0
            and not (cos.requires_grad or sin.requires_grad) and q.device == cos.device)

"""RMSNorm with a frozen weight through the Triton kernels; saves its input and one fp32 rstd per row.

`add_rms_norm` is the decoder layer's "residual + sublayer output, then normalize" as one Function: the
sum and its norm come from one kernel, and backward adds the gradient the sum gets from the residual
path inside the norm's backward kernel, where autograd would have summed the two in a pass of its own.
"""

import torch

from ..kernels.rms_norm import add_rms_norm_forward, rms_norm_forward, rms_norm_backward
from .forward_only import apply


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset_weight: bool):
        x2d = _rows(x)
        y, rstd = rms_norm_forward(x2d, weight, eps, offset_weight)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset_weight = offset_weight
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, rstd = ctx.saved_tensors
        dx = rms_norm_backward(_rows(grad_out), x2d, weight, rstd, offset_weight=ctx.offset_weight)
        return dx.view(grad_out.shape), None, None, None


class AddRMSNormFunction(torch.autograd.Function):
    """(s, RMSNorm(s)) for s = residual + delta, or s = residual when delta is None (s is then returned
    as a view of residual, so that its gradient still comes back through this Function). A narrower delta
    gets s's gradient rounded to its dtype, as torch's add gives it: written by the backward kernel beside
    s's (a bf16 o_proj output added to the fp32 residual of a prepared model), not cast from it."""

    @staticmethod
    def forward(ctx, residual, delta, weight, eps: float, out_dtype=None):
        delta2d = None if delta is None else _rows(delta)
        total, y, rstd = add_rms_norm_forward(_rows(residual), delta2d, weight, eps, out_dtype=out_dtype)
        ctx.save_for_backward(total, weight, rstd)
        ctx.has_delta = delta is not None
        ctx.delta_dtype = None if delta is None or delta.dtype == residual.dtype else delta.dtype
        return total.view(residual.shape), y.view(*residual.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_total, grad_normed):
        total, weight, rstd = ctx.saved_tensors
        narrow = None if ctx.delta_dtype is None else torch.empty_like(total, dtype=ctx.delta_dtype)
        grad = rms_norm_backward(_rows(grad_normed), total, weight, rstd, residual_grad=_rows(grad_total),
                                 narrow_copy=narrow)
        grad = grad.view(grad_total.shape)
        grad_delta = (grad if narrow is None else narrow.view(grad_total.shape)) if ctx.has_delta else None
        return grad, grad_delta, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset_weight: bool = False) -> torch.Tensor:
    """Llama's RMSNorm, or Gemma's ((1 + w), in fp32, y in x's dtype) with `offset_weight`."""
    return apply(RMSNormFunction, x, weight, eps, offset_weight)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None):
    """(residual + delta, RMSNorm(residual + delta)) as torch computes them, with delta None meaning no
    addition; the norm rounded to `out_dtype` where given (a consumer that rounds its input to it first).
    A delta of another shape, or of a dtype the sum would not be in, is added by torch first."""
    if delta is not None and (torch.promote_types(delta.dtype, residual.dtype) != residual.dtype
                              or delta.shape != residual.shape):
        residual, delta = residual + delta, None
    return apply(AddRMSNormFunction, residual, delta, weight, eps, out_dtype)

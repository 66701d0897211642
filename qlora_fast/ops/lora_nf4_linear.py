"""The fused QLoRA linear: y = x @ W^T + s * (x_lora @ A^T) @ B^T (+ bias), W in NF4.

Where x is wider than the compute dtype (fp32 hidden states, bf16 compute) the output is x's dtype and
the sum of the bf16 base output and the term is not rounded, as stock peft sums it (ops/adapters.py).
Saves for backward only x_lora and x_lora @ A^T (never a dequantized W); backward computes
dX = dY @ W + s * (dY @ B) @ A, dA = s * (dY @ B)^T @ x_lora, dB = s * dY^T @ (x_lora @ A^T).
x_lora is x itself, or dropout(x) when the adapter has dropout. With `keep_output` (the attention
projections), the base output x @ W^T of an offloaded checkpoint's first pass is kept for its recompute,
which then skips the dequantize and the GEMM (ops/offloaded_checkpoint.py); the term is then added into
a new tensor in both passes, leaving the kept one unchanged.
"""

import torch

from ..kernels.low_rank import LowRank
from ..kernels.low_rank_add import low_rank_add_
from ..nf4 import NF4Weight
from .adapters import adapters_in, plus_low_rank_terms
from .forward_only import apply
from .lora_grads import scaled_mm
from .nf4_linear import nf4_linear_backward, nf4_linear_forward
from .offloaded_checkpoint import kept_or_computed


class LoRANF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, scaling: float, weight: NF4Weight, bias, compute_dtype,
                keep_output: bool = False):
        out_dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        xl2 = x2 if x_lora is x else x_lora.reshape(-1, x_lora.shape[-1]).to(compute_dtype)
        a, b = (lora_a, lora_b) if lora_a.dtype == lora_b.dtype == compute_dtype else \
            adapters_in(compute_dtype, lora_a, lora_b)
        base = lambda: nf4_linear_forward(x2, weight, None if bias is None else bias.to(compute_dtype))
        y = kept_or_computed(weight, base) if keep_output else base()
        xa = xl2 @ a.t()
        y = plus_low_rank_terms(y, [(y, LowRank(xa, b, scaling))], out_dtype, fresh=keep_output)

        ctx.save_for_backward(xl2, xa, a, b)
        ctx.scaling = scaling
        ctx.weight = weight
        ctx.shared_input = x_lora is x
        ctx.x_meta = (x.shape, x.dtype)
        ctx.x_lora_meta = (x_lora.shape, x_lora.dtype)
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)
        dy_b = dy @ b  # (tokens, r)

        grad_a = grad_b = grad_x = grad_x_lora = None
        if ctx.needs_input_grad[2]:
            grad_a = scaled_mm(dy_b.t(), xl2, s, ctx.lora_dtypes[0])
        if ctx.needs_input_grad[3]:
            grad_b = scaled_mm(dy.t(), xa, s, ctx.lora_dtypes[1])
        if ctx.shared_input:
            if ctx.needs_input_grad[0]:
                grad_x = low_rank_add_(nf4_linear_backward(dy, ctx.weight), LowRank(dy_b, a.t(), s))
                grad_x = grad_x.view(ctx.x_meta[0]).to(ctx.x_meta[1])
        else:
            if ctx.needs_input_grad[0]:
                grad_x = nf4_linear_backward(dy, ctx.weight).view(ctx.x_meta[0]).to(ctx.x_meta[1])
            if ctx.needs_input_grad[1]:
                grad_x_lora = (dy_b @ a).mul_(s).view(ctx.x_lora_meta[0]).to(ctx.x_lora_meta[1])
        return grad_x, grad_x_lora, grad_a, grad_b, None, None, None, None, None


def lora_nf4_linear(x, x_lora, lora_a, lora_b, scaling, weight: NF4Weight, bias=None, compute_dtype=None,
                    keep_output: bool = False):
    """Autograd entry point; `compute_dtype` defaults to x's dtype."""
    return apply(LoRANF4LinearFunction, x, x_lora, lora_a, lora_b, scaling, weight, bias,
                 compute_dtype or x.dtype, keep_output)

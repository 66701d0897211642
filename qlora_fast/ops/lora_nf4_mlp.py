"""The fused QLoRA gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-approximated GELU
(GeGLU), each projection an NF4 weight plus LoRA, in one autograd Function.

Saves x, the gate and up outputs g and u, and the rank-r products x @ A_gate^T, x @ A_up^T (one GEMM)
and h @ A_down^T: never h = silu(g) * u, silu(g) or a dequantized weight. The six adapters are cast by
one launch (ops/adapters.py). The LoRA terms of gate and up (forward
and backward) and of the down projection's input gradient dh (backward) are added inside the SwiGLU
kernels, not by an in-place GEMM over each (tokens x intermediate) tensor. Backward recomputes h inside
the SwiGLU backward kernel, which overwrites g and u with their gradients and, while dg, du and h are in
its registers, sums the gate and up B gradients and the down A gradient (kernels/swiglu.py): h is never
written and no GEMM reads dg, du or h back for them (up to rank 32; above, the kernel writes h over dh
and three GEMMs form them, which is faster there); no (tokens x intermediate) tensor is allocated
beyond dh. Above rank 32, where the input is in the compute dtype, the three terms ride in their base
GEMMs instead (ops/terms_in_gemm.py, which says when a wider input's may): g and u are saved with theirs
and the SwiGLU kernels add none.
One Function per MLP instead of three LoRA layers and two elementwise ops also means fewer host calls
per layer, which is what small batches are bound by.

Where x is wider than the compute dtype (fp32 hidden states of a prepared model, bf16 compute), g, u and
silu(g) * u stay fp32 inside the kernel until h is rounded for the down projection, and the output is
x's dtype, base + term unrounded: what stock peft computes there (ops/adapters.py); so do they where
`out_dtype` is wider (x handed on narrowed, its stock dtype that one: patching/norms.py).

With `output_needed=False` (a checkpoint's recompute of a layer that only adds the MLP output to its
residual) forward skips the down projection's GEMM and returns an unwritten tensor: backward needs
only what forward saves, not y. With a `residual` (the layer's first pass, which adds the output to its
residual stream) it returns residual + output, added where the down projection's LoRA term is (one pass
over the output instead of two); the residual's gradient is the output's.
"""

import torch

from ..kernels.low_rank import LowRank
from ..kernels.low_rank_add import low_rank_add_
from ..kernels.swiglu import sums_in_kernel, swiglu_backward_, swiglu_backward_writing_h_, swiglu_forward
from ..nf4 import NF4Weight
from .adapters import adapters_in, plus_low_rank_terms, stacked_rows, wider
from .forward_only import apply
from .lora_grads import add_shared_input_terms_, products_side_by_side, scaled_mm, shared_input_a_grads
from .nf4_linear import nf4_linear_backward, nf4_linear_forward
from .terms_in_gemm import gate_up_with_terms, input_grad_with_term, terms_fit_in_gemm


def _scaled(fp32_sum: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """scaling * an fp32 sum, rounded once to dtype, as scaled_mm rounds its GEMM's."""
    return (fp32_sum * scaling).to(dtype)


def _lora_project(x2, xa, weight: NF4Weight, lora_b, scaling: float, out_dtype, residual=None):
    """x2 @ W^T + s * xa @ B^T, where xa = x2 @ A^T, in out_dtype; plus the 2-D `residual` (of out_dtype)
    where given, both sums rounded to out_dtype as torch rounds them."""
    y = nf4_linear_forward(x2, weight)
    term = LowRank(xa, lora_b, scaling)
    if residual is not None:
        return low_rank_add_(y, term, out=torch.empty_like(residual), residual=residual)
    return plus_low_rank_terms(y, [(y, term)], out_dtype)


class LoRANF4MLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_a, gate_b, up_a, up_b, down_a, down_b, weights, scalings, compute_dtype,
                output_needed=True, activation="silu", out_dtype=None, residual=None):
        out_dtype = out_dtype or x.dtype
        w_gate, w_up, w_down = weights
        s_gate, s_up, s_down = scalings
        ctx.lora_dtypes = [t.dtype for t in (gate_a, gate_b, up_a, up_b, down_a, down_b)]
        gate_a, up_a, gate_b, up_b, down_a, down_b = adapters_in(compute_dtype, gate_a, up_a, gate_b, up_b,
                                                                 down_a, down_b)
        gate_up_a = stacked_rows((gate_a, up_a))
        ctx.wide, ctx.activation = wider(out_dtype, compute_dtype), activation
        ctx.terms_in_gemm = terms_fit_in_gemm(x, gate_a.shape[0], weights, ctx.wide, output_needed)

        if ctx.terms_in_gemm:
            x2, xa_gate, xa_up, g, u = gate_up_with_terms(x.reshape(-1, x.shape[-1]), gate_up_a,
                                                          (gate_b, s_gate, w_gate), (up_b, s_up, w_up),
                                                          compute_dtype)
            h = swiglu_forward(g, u, wide=ctx.wide, activation=activation)
        else:
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
            xa_gate, xa_up = (x2 @ gate_up_a.t()).split([gate_a.shape[0], up_a.shape[0]], 1)
            g, u = nf4_linear_forward(x2, w_gate), nf4_linear_forward(x2, w_up)
            h = swiglu_forward(g, u, LowRank(xa_gate, gate_b, s_gate), LowRank(xa_up, up_b, s_up),
                               wide=ctx.wide, activation=activation)
        ha_down = h @ down_a.t()
        ctx.has_residual = residual is not None
        if output_needed:
            residual2d = None if residual is None else residual.reshape(-1, residual.shape[-1])
            y = _lora_project(h, ha_down, w_down, down_b, s_down, out_dtype, residual2d)
        else:
            y = x.new_empty(x2.shape[0], w_down.shape[0], dtype=out_dtype)

        ctx.save_for_backward(x2, xa_gate, xa_up, g, u, ha_down, gate_up_a, gate_b, up_b, down_a, down_b)
        ctx.weights, ctx.scalings = weights, scalings
        ctx.x_meta = (x.shape, x.dtype)
        return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa_gate, xa_up, g, u, ha_down, gate_up_a, gate_b, up_b, down_a, down_b = ctx.saved_tensors
        w_gate, w_up, w_down = ctx.weights
        s_gate, s_up, s_down = ctx.scalings
        dtypes = ctx.lora_dtypes
        options = dict(wide=ctx.wide, activation=ctx.activation)
        grad_out2 = grad_out.reshape(-1, grad_out.shape[-1])

        if ctx.terms_in_gemm:  # g and u were saved with their terms; dh takes its own from its GEMM
            dy, dy_b, dh = input_grad_with_term(grad_out2, down_b, down_a, s_down, w_down)
            terms = None
        else:
            dy = grad_out2.to(x2.dtype)
            dy_b = dy @ down_b
            dh = nf4_linear_backward(dy, w_down)
            terms = LowRank(dy_b, down_a.t(), s_down), LowRank(xa_gate, gate_b, s_gate), LowRank(xa_up, up_b, s_up)
        if terms is not None and sums_in_kernel(*terms):
            dg, du, (gate_b_sum, up_b_sum, down_a_sum) = swiglu_backward_(dh, g, u, *terms, **options)
            grad_down_a = _scaled(down_a_sum, s_down, dtypes[4]).t().contiguous()
            grad_gate_b, grad_up_b = _scaled(gate_b_sum, s_gate, dtypes[1]), _scaled(up_b_sum, s_up, dtypes[3])
        else:
            dg, du, h = swiglu_backward_writing_h_(dh, g, u, *(terms or ()), **options)
            grad_down_a = scaled_mm(dy_b.t(), h, s_down, dtypes[4])
            grad_gate_b = scaled_mm(dg.t(), xa_gate, s_gate, dtypes[1])
            grad_up_b = scaled_mm(du.t(), xa_up, s_up, dtypes[3])
            del h
        grad_down = (grad_down_a, scaled_mm(dy.t(), ha_down, s_down, dtypes[5]))
        del dh

        # [dg @ B_gate | du @ B_up] side by side: one GEMM for both A gradients (with one scaling) and one
        # pass for both LoRA terms of dX
        ranks = [gate_b.shape[1], up_b.shape[1]]
        dgu_b = products_side_by_side((dg, du), (gate_b, up_b))
        grad_gate_a, grad_up_a = shared_input_a_grads(dgu_b, x2, ranks, (s_gate, s_up), (dtypes[0], dtypes[2]))
        grad_gate, grad_up = (grad_gate_a, grad_gate_b), (grad_up_a, grad_up_b)

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_linear_backward(du, w_up, accumulate=nf4_linear_backward(dg, w_gate))
            add_shared_input_terms_(grad_x, dgu_b, gate_up_a, ranks, (s_gate, s_up))
            grad_x = grad_x.view(ctx.x_meta[0]).to(ctx.x_meta[1])
        grad_residual = grad_out if ctx.has_residual else None
        return (grad_x, *grad_gate, *grad_up, *grad_down, None, None, None, None, None, None, grad_residual)


def lora_nf4_mlp(x, gate, up, down, compute_dtype=None, output_needed=True, activation="silu", out_dtype=None,
                 residual=None):
    """Autograd entry point. gate, up and down are (lora_a, lora_b, scaling, NF4Weight) of each
    projection; `compute_dtype` and `out_dtype` (the output's) default to x's dtype; `activation`: one of
    kernels/swiglu.ACTIVATIONS; `residual` (the output's shape and dtype, unit column stride): returns
    residual + the MLP's output."""
    (gate_a, gate_b, s_gate, w_gate), (up_a, up_b, s_up, w_up), (down_a, down_b, s_down, w_down) = gate, up, down
    return apply(LoRANF4MLPFunction, x, gate_a, gate_b, up_a, up_b, down_a, down_b, (w_gate, w_up, w_down),
                 (s_gate, s_up, s_down), compute_dtype or x.dtype, output_needed, activation, out_dtype, residual)

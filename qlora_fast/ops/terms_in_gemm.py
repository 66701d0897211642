"""LoRA terms carried inside the base GEMM, its reduction widened by the rank.

x @ W^T + s * xa @ B^T = [x | s * xa] @ [W | B]^T with xa = x @ A^T: the term becomes r more columns of
the GEMM's reduction (K + 64 on a 4096-wide input: 1.6% more work) instead of rank-r products inside a
tile kernel, which small tiles run at a fraction of tensor-core rate once the rank is large, or another
pass over the (tokens x out) output. The dequantize writes W into its columns of the wider weight
(kernels/nf4_dequantize.py) and B is copied beside it; s * xa is written beside x.

The fused MLP takes this path for gate and up in forward, so g and u are saved with their terms and its
backward kernel adds none, and for the down projection's input gradient dh = [dy | s * dy @ B] @ [W; A].

Rounding: each output is rounded once to the compute dtype from the GEMM's fp32 accumulator, base and term
together (the tile kernels add the term to the rounded base and round again); s * xa is rounded to the
compute dtype first (exact where s is a power of two, as alpha / r usually is). So this path serves
layers whose input is in the compute dtype: where it is wider (the prepared recipe's fp32 hidden states),
stock keeps the rounded base plus the term in fp32 (ops/adapters.py, `wider`), and a term below half an ulp
of the base must survive (tests/test_prepared_model.py), which one rounding of the sum would lose. It
serves them too for a checkpoint's recompute, whose output is never read: its g and u feed only the
backward, where one rounding of base + term is the bf16 recipe's (a bf16 ulp of g at most from stock's
fp32 sum, in silu's derivative and in h for the down projection's gradients; measured in
bench/RESULTS.md, session 21).
"""

import torch

from ..kernels.swiglu import SUMS_MAX_RANK
from ..kernels.low_rank import padded_rank
from ..kernels.nf4_dequantize import nf4_dequantize
from ..nf4 import NF4Weight
from .nf4_linear import uses_in_gemm_dequantize


def terms_fit_in_gemm(x: torch.Tensor, rank: int, weights, wide: bool = False, output_read: bool = True) -> bool:
    """Whether projections of this rank take their terms inside the GEMM: ranks past the SwiGLU kernels'
    in-kernel sums (above, their tile products cost more than the wider GEMM), a multiple of 8 (columns
    16-byte aligned for cuBLAS and the dequantize's wide stores), weights whose rows hold whole
    quantization blocks, and dequantize + cuBLAS rather than the in-GEMM kernel. An input wider than the
    compute dtype (`wide`) takes it only for an output never read (a checkpoint's recompute)."""
    if wide and output_read:
        return False
    return (padded_rank(rank) > SUMS_MAX_RANK and rank % 8 == 0
            and all(w.shape[1] % w.blocksize == 0 for w in weights)
            and not uses_in_gemm_dequantize(x.numel() // x.shape[-1], x.device))


def _beside(weight: NF4Weight, b: torch.Tensor, b_first: bool) -> torch.Tensor:
    """[B | W] (b_first) or [W | B]: the weight dequantized into its columns of one (out, in + r) matrix."""
    out_features, in_features = weight.shape
    rank = b.shape[1]
    wide = torch.empty(out_features, in_features + rank, dtype=b.dtype, device=b.device)
    if b_first:
        w_columns, b_columns = wide[:, rank:], wide[:, :rank]
    else:
        w_columns, b_columns = wide[:, :in_features], wide[:, in_features:]
    nf4_dequantize(weight, b.dtype, out=w_columns)
    b_columns.copy_(b)
    return wide


def gate_up_with_terms(x: torch.Tensor, gate_up_a: torch.Tensor, gate: tuple, up: tuple, compute_dtype):
    """(x2, xa_gate, xa_up, g, u) for the 2-D input x (any float dtype): x2 = x in compute_dtype, xa_* =
    x2 @ A_*^T and g, u = x2 @ W^T + s * xa @ B^T, where gate_up_a = [A_gate; A_up] and gate, up =
    (B, scaling, NF4Weight). One (tokens, r + in + r) buffer holds [s * xa_gate | x2 | s * xa_up]: gate's
    GEMM reads its first in + r columns against [B_gate | W_gate], up's its last against [W_up | B_up]; x2
    is a view of it."""
    (gate_b, s_gate, w_gate), (up_b, s_up, w_up) = gate, up
    rows, width = x.shape
    rank = gate_b.shape[1]
    wide_x = torch.empty(rows, width + 2 * rank, dtype=compute_dtype, device=x.device)
    x2 = wide_x[:, rank:rank + width]
    x2.copy_(x)
    xa_gate, xa_up = (x2 @ gate_up_a.t()).split([rank, rank], 1)
    torch.mul(xa_gate, s_gate, out=wide_x[:, :rank])
    torch.mul(xa_up, s_up, out=wide_x[:, rank + width:])
    g = wide_x[:, :rank + width] @ _beside(w_gate, gate_b, b_first=True).t()
    u = wide_x[:, rank:] @ _beside(w_up, up_b, b_first=False).t()
    return x2, xa_gate, xa_up, g, u


def input_grad_with_term(grad_out: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float,
                         weight: NF4Weight):
    """(dy, dy_b, dx) of a LoRA projection y = x @ W^T + s * (x @ A^T) @ B^T for the 2-D grad_out (any
    float dtype; dy is it in B's dtype): dy_b = dy @ B and dx = [dy | s * dy_b] @ [W; A], one GEMM whose
    weight has A's rows under W's (contiguous: the dequantize writes W's rows as they are)."""
    rows, out_features = grad_out.shape
    rank = b.shape[1]
    wide_dy = torch.empty(rows, out_features + rank, dtype=b.dtype, device=b.device)
    dy = wide_dy[:, :out_features]
    dy.copy_(grad_out)
    dy_b = dy @ b
    torch.mul(dy_b, scaling, out=wide_dy[:, out_features:])
    wide_w = torch.empty(out_features + rank, weight.shape[1], dtype=b.dtype, device=b.device)
    nf4_dequantize(weight, b.dtype, out=wide_w[:out_features])
    wide_w[out_features:].copy_(a)
    return dy, dy_b, wide_dy @ wide_w

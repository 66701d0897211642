"""The adapter gradients of LoRA projections y = x @ W^T + s * (x @ A^T) @ B^T, and their LoRA terms of
dX, shared by the fused linear, MLP and q/k/v Functions."""

import torch

from ..kernels.low_rank import LowRank
from ..kernels.low_rank_add import low_rank_add_


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None):
    """scale * (a @ b) in one GEMM launch, in `out_dtype` (default a's): the scale rides on alpha, and
    beta=0 makes addmm ignore its (unwritten, broadcast) input instead of a second pass to scale the
    product. On CUDA an fp32 result of fp16/bf16 operands comes straight out of the GEMM's fp32
    accumulator: no 16-bit rounding, and no cast launch."""
    out_dtype = out_dtype or a.dtype
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.addmm(a.new_empty((), dtype=out_dtype), a, b, out_dtype=out_dtype, beta=0, alpha=scale)
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale).to(out_dtype)


def _one_scaling(scalings) -> bool:
    return len(set(scalings)) == 1


def shared_input_a_grads(dy_b, x, ranks, scalings, dtypes) -> list:
    """dA_i = s_i * (dY_i @ B_i)^T @ x of projections of one input x, with the dY_i @ B_i side by side
    in dy_b: one GEMM for all of them where they share a scaling and a dtype."""
    if _one_scaling(scalings) and len(set(dtypes)) == 1:
        return list(scaled_mm(dy_b.t(), x, scalings[0], dtypes[0]).split(ranks))
    return [scaled_mm(part.t(), x, s, dtype) for part, s, dtype in zip(dy_b.split(ranks, 1), scalings, dtypes)]


def products_side_by_side(lefts, rights) -> torch.Tensor:
    """[l_1 @ r_1 | l_2 @ r_2 | ...] (each r_i of a few columns) in one new tensor, each product written
    straight into its column block."""
    out = lefts[0].new_empty(lefts[0].shape[0], sum(r.shape[1] for r in rights))
    for left, right, block in zip(lefts, rights, out.split([r.shape[1] for r in rights], 1)):
        torch.mm(left, right, out=block)
    return out


def add_shared_input_terms_(grad_x, dy_b, a_stacked, ranks, scalings) -> torch.Tensor:
    """grad_x += sum_i s_i * (dY_i @ B_i) @ A_i in one pass, the dY_i @ B_i side by side in dy_b and the
    A_i row-stacked in a_stacked; several scalings ride on a scaled copy of the (small) A_i."""
    scale = scalings[0]
    if not _one_scaling(scalings):
        a_stacked, scale = torch.cat([a * s for a, s in zip(a_stacked.split(ranks), scalings)]), 1.0
    return low_rank_add_(grad_x, LowRank(dy_b, a_stacked.t(), scale))

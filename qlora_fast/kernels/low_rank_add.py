"""y += s * xa @ B^T in place, the LoRA term of a projection whose output no other kernel of ours reads
first (q/k/v, o_proj, and the input gradients through them); or out = y + s * xa @ B^T into a wider
`out` (fp32 outputs of a bf16 GEMM, for layers whose input is fp32); with a `residual`, out = residual + that
sum (a decoder layer's MLP output added to its residual stream: each sum rounded to out's dtype, as torch
rounds the two adds).

Against cuBLAS' `y.addmm_(xa, B^T, alpha=s)` (a GEMM with K = r over the whole output; bench/kernel_timings.py
times both): each tile of y is read once, takes its term from one tensor-core product
(kernels/low_rank.py), and is written once, the sum rounded once to the output's dtype. y (and out) may
be a column block of a wider tensor (row stride >= its width, unit column stride).
"""

import torch
import triton
import triton.language as tl

from ._utils import round_fp32_to
from .low_rank import (LOW_RANK_ADD_META, LowRank, launch_tiles, load_fp32, plus_low_rank, takes_large_rank_tiles,
                       term_args, tile)


@triton.jit(do_not_specialize=["n_rows"])  # packed batches change the token count every step
def _low_rank_add_kernel(y_ptr, stride_ym, out_ptr, stride_om, residual_ptr, stride_rm, n_rows, n_cols, rank,
                         xa_ptr, b_ptr, scale, stride_xm, stride_xr, stride_bn, stride_br,
                         HAS_RESIDUAL: tl.constexpr, R: tl.constexpr, UPCAST_DOT: tl.constexpr,
                         SOFTWARE_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         COLS_FAST: tl.constexpr):
    rows, cols, offs, mask = tile(n_rows, n_cols, stride_ym, BLOCK_M, BLOCK_N, COLS_FAST)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    y = plus_low_rank(load_fp32(y_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_ptr, b_ptr, scale,
                      stride_xm, stride_xr, stride_bn, stride_br, True, R, UPCAST_DOT, SOFTWARE_RTNE, dtype)
    if HAS_RESIDUAL:
        residual = load_fp32(residual_ptr, rows[:, None] * stride_rm + cols[None, :], mask)
        y = round_fp32_to(residual + y, dtype, SOFTWARE_RTNE).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(dtype), mask=mask)


# Below this many output elements a CUDA call takes cuBLAS' addmm_: there the kernel saved ~4 us of GPU time
# per call, less than the ~8 us more host time a Triton launch costs than an aten one (bench/RESULTS.md),
# and steps of that size are bound by the host.
KERNEL_MIN_ELEMENTS = 2**24


def _check_2d(t: torch.Tensor, name: str):
    if t.dim() != 2 or t.stride(1) != 1 or t.stride(0) < t.shape[1]:
        raise ValueError(f"low_rank_add_: {name} must be 2-D with unit column stride; got strides {t.stride()}")


# Above SMALL_RANK_MAX (kernels/low_rank.py): 64-row tiles, 0.0682 ms at r=64 on an (8192, 4096) output on
# the H100 against 0.0763 in LOW_RANK_ADD_META's (bench/RESULTS.md, session 21)
LARGE_RANK_ADD_META = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "COLS_FAST": True}


def low_rank_add_(y: torch.Tensor, term: LowRank, meta: dict | None = None,
                  out: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Adds term.scale * term.xa @ term.b^T to the 2-D `y` in place (one rounding per element) and returns y;
    with `out` (y's shape, any float dtype), writes y + term there instead and returns out; with a
    `residual` too (out's shape and dtype), writes residual + (y + term), each sum rounded to out's dtype.
    `meta`: launch parameters (default by the term's rank)."""
    _check_2d(y, "y")
    if out is None:
        if residual is not None:
            raise ValueError("low_rank_add_: a residual needs an out")
        if y.is_cuda and y.numel() < KERNEL_MIN_ELEMENTS:
            return y.addmm_(term.xa, term.b.t(), alpha=term.scale)
        out = y
    else:
        _check_2d(out, "out")
        if out.shape != y.shape:
            raise ValueError(f"low_rank_add_: out {tuple(out.shape)} differs from y {tuple(y.shape)}")
    if residual is not None:
        _check_2d(residual, "residual")
        if residual.shape != out.shape or residual.dtype != out.dtype:
            raise ValueError(f"low_rank_add_: residual {tuple(residual.shape)} {residual.dtype} differs from out "
                             f"{tuple(out.shape)} {out.dtype}")
    meta = meta or (LARGE_RANK_ADD_META if takes_large_rank_tiles(term.xa.shape[1]) else LOW_RANK_ADD_META)
    launch_tiles(_low_rank_add_kernel, y, (term,), meta, y, y.stride(0), out, out.stride(0),
                 y if residual is None else residual, 0 if residual is None else residual.stride(0),
                 term_args=term_args(term, y), HAS_RESIDUAL=residual is not None)
    torch.autograd.graph.increment_version(out)
    return out

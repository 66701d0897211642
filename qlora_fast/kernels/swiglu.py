"""SwiGLU, h = silu(g) * u, forward and backward, with the LoRA terms of the projections around it added
on the fly, and torch's roundings: silu(g) is rounded to g's dtype before the product (as
`act_fn(gate) * up` computes it in two ops). On the GPU the plain kernels match torch bit for bit in
bf16; in fp16 a few elements differ by one ulp (Triton's exp vs CUDA's expf).

A LoRA projection's output is base + s * xa @ B^T, xa = x @ A^T of rank r. Added by cuBLAS in place
(`addmm_`) that is one more read and write of a (tokens x intermediate) tensor per projection; here each
tile of g (or u, or dh) takes its rank-r term from a small tensor-core product of xa's rows and B's
rows, in fp32, rounded once as addmm_ rounds it. Forward reads the GEMMs' g and u and writes h (and,
when backward will need them, g and u with their LoRA terms, in place); backward reads dh (its LoRA term
added likewise), g and u, and overwrites them with h (recomputed for the down projection's LoRA
gradient), dg and du, so it needs no extra memory.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING
from .nf4_decode import round_fp32_to


class LowRank(NamedTuple):
    """The rank-r term scale * xa @ b^T of a (rows, cols) output: xa (rows, r), b (cols, r), any strides."""

    xa: torch.Tensor
    b: torch.Tensor
    scale: float


@triton.jit
def _tile(n_rows, n_cols, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile: rows, columns, element offsets and mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, cols, rows[:, None] * stride + cols[None, :], mask


@triton.jit
def _load_fp32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _plus_low_rank(base, rows, cols, n_rows, n_cols, rank, xa_ptr, b_ptr, scale,
                   stride_xm, stride_xr, stride_bn, stride_br, HAS_TERM: tl.constexpr, R: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, dtype: tl.constexpr):
    """base + scale * xa[rows] @ b[cols]^T in fp32, rounded to dtype as addmm_ rounds it (base as is
    without a term)."""
    if HAS_TERM:  # one tensor-core product of xa's rows by b's rows, the rank padded to R >= 16
        r = tl.arange(0, R)
        xa = tl.load(xa_ptr + rows[:, None] * stride_xm + r[None, :] * stride_xr,
                     mask=(rows[:, None] < n_rows) & (r[None, :] < rank), other=0.0)
        b_t = tl.load(b_ptr + cols[None, :] * stride_bn + r[:, None] * stride_br,
                      mask=(cols[None, :] < n_cols) & (r[:, None] < rank), other=0.0)
        if UPCAST_DOT:  # fp32 operands exactly, and the CPU interpreter's dot is wrong on bf16
            term = tl.dot(xa.to(tl.float32), b_t.to(tl.float32), input_precision="ieee")
        else:
            term = tl.dot(xa, b_t)
        return round_fp32_to(base + scale * term, dtype, SOFTWARE_RTNE).to(tl.float32)
    else:
        return base


@triton.jit
def _silu_rounded(g, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr):
    """(sigmoid(g), silu(g) rounded to dtype and back to fp32), g in fp32; silu as torch writes it."""
    denominator = 1.0 + tl.exp(-g)
    return 1.0 / denominator, round_fp32_to(g / denominator, dtype, SOFTWARE_RTNE).to(tl.float32)


@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, rank,
                           xa_g_ptr, b_g_ptr, s_g, g_sxm, g_sxr, g_sbn, g_sbr,
                           xa_u_ptr, b_u_ptr, s_u, u_sxm, u_sxr, u_sbn, u_sbr,
                           GATE_TERM: tl.constexpr, UP_TERM: tl.constexpr, WRITE_INPUTS: tl.constexpr,
                           R: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, offs, mask = _tile(n_rows, n_cols, n_cols, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = h_ptr.dtype.element_ty
    g = _plus_low_rank(_load_fp32(g_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_g_ptr, b_g_ptr,
                       s_g, g_sxm, g_sxr, g_sbn, g_sbr, GATE_TERM, R, UPCAST_DOT, SOFTWARE_RTNE, dtype)
    u = _plus_low_rank(_load_fp32(u_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_u_ptr, b_u_ptr,
                       s_u, u_sxm, u_sxr, u_sbn, u_sbr, UP_TERM, R, UPCAST_DOT, SOFTWARE_RTNE, dtype)
    if WRITE_INPUTS:  # backward reads the projections' outputs with their LoRA terms
        tl.store(g_ptr + offs, g.to(dtype), mask=mask)
        tl.store(u_ptr + offs, u.to(dtype), mask=mask)
    _, silu = _silu_rounded(g, dtype, SOFTWARE_RTNE)
    tl.store(h_ptr + offs, round_fp32_to(silu * u, dtype, SOFTWARE_RTNE), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, n_rows, n_cols, rank, xa_ptr, b_ptr, scale,
                            stride_xm, stride_xr, stride_bn, stride_br,
                            DH_TERM: tl.constexpr, R: tl.constexpr, UPCAST_DOT: tl.constexpr,
                            SOFTWARE_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # In place: dh_ptr <- h, g_ptr <- dg, u_ptr <- du. Each element is read before it is overwritten.
    rows, cols, offs, mask = _tile(n_rows, n_cols, n_cols, BLOCK_M, BLOCK_N)
    dtype: tl.constexpr = dh_ptr.dtype.element_ty
    dh = _plus_low_rank(_load_fp32(dh_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_ptr, b_ptr, scale,
                        stride_xm, stride_xr, stride_bn, stride_br, DH_TERM, R, UPCAST_DOT, SOFTWARE_RTNE,
                        dtype)
    g, u = _load_fp32(g_ptr, offs, mask), _load_fp32(u_ptr, offs, mask)
    sig, silu = _silu_rounded(g, dtype, SOFTWARE_RTNE)
    d_silu = round_fp32_to(dh * u, dtype, SOFTWARE_RTNE).to(tl.float32)
    dg = d_silu * sig * (1.0 + g * (1.0 - sig))
    tl.store(dh_ptr + offs, round_fp32_to(silu * u, dtype, SOFTWARE_RTNE), mask=mask)
    tl.store(g_ptr + offs, round_fp32_to(dg, dtype, SOFTWARE_RTNE), mask=mask)
    tl.store(u_ptr + offs, round_fp32_to(dh * silu, dtype, SOFTWARE_RTNE), mask=mask)


def _check(*tensors):
    first = tensors[0]
    for t in tensors:
        if t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous():
            raise ValueError("swiglu: inputs must be contiguous tensors of one shape and dtype")


def _term_args(term: LowRank | None, like: torch.Tensor):
    """(xa, b, scale, xa's strides, b's strides) kernel arguments of a term; placeholders (never read)
    without one."""
    if term is None:
        return like, like, 0.0, 0, 0, 0, 0
    rows, cols = like.numel() // like.shape[-1], like.shape[-1]
    if term.xa.shape != (rows, term.b.shape[1]) or term.b.shape[0] != cols or term.xa.dtype != like.dtype \
            or term.b.dtype != like.dtype:
        raise ValueError(f"swiglu: a LoRA term for a {(rows, cols)} {like.dtype} output needs xa (rows, r) and "
                         f"b (cols, r) in that dtype; got {tuple(term.xa.shape)}, {tuple(term.b.shape)}")
    return term.xa, term.b, float(term.scale), *term.xa.stride(), *term.b.stride()


# Launch parameters on the GPU, fixed rather than autotuned (the backward kernel overwrites its inputs);
# bench/kernels.py times the candidates, the first is the default (fastest on the H100, bench/RESULTS.md).
# Forming the term from rank-1 updates in fp32 registers instead of a tensor-core product measured
# 1.5-3.5x slower.
CANDIDATE_META = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8},
]


def _launch(kernel, like: torch.Tensor, terms, meta: dict, *args, **constexprs):
    """Launches a tile kernel over `like` viewed as (rows, last dim)."""
    rows, cols = like.numel() // like.shape[-1], like.shape[-1]
    ranks = {t.xa.shape[1] for t in terms if t is not None}
    if len(ranks) > 1:
        raise ValueError("swiglu: LoRA terms of different ranks")
    rank = ranks.pop() if ranks else 1
    if INTERPRETING:  # few, large programs: the interpreter pays per program
        block_n = max(16, min(triton.next_power_of_2(cols), 1024))
        meta = dict(meta, BLOCK_N=block_n, BLOCK_M=max(16, INTERPRETER_TILE // block_n))
    grid = (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]))
    kernel[grid](*args, rows, cols, rank, *constexprs.pop("term_args"), R=max(16, triton.next_power_of_2(rank)),
                 UPCAST_DOT=INTERPRETING or like.dtype == torch.float32, SOFTWARE_RTNE=INTERPRETING,
                 **meta, **constexprs)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, gate_term: LowRank | None = None,
                   up_term: LowRank | None = None, write_inputs: bool = False,
                   meta: dict = CANDIDATE_META[0]) -> torch.Tensor:
    """silu(g + gate_term) * (u + up_term) in g's dtype; with `write_inputs`, g and u are overwritten
    with g + gate_term and u + up_term (each rounded once, as addmm_ would)."""
    _check(g, u)
    h = torch.empty_like(g)
    term_args = (*_term_args(gate_term, g), *_term_args(up_term, u))
    _launch(_swiglu_forward_kernel, g, (gate_term, up_term), meta, g, u, h, term_args=term_args,
            GATE_TERM=gate_term is not None, UP_TERM=up_term is not None, WRITE_INPUTS=write_inputs)
    if write_inputs:
        for t in (g, u):
            torch.autograd.graph.increment_version(t)
    return h


def swiglu_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dh_term: LowRank | None = None,
                     meta: dict = CANDIDATE_META[0]):
    """Overwrites (dh, g, u) with (h, dg, du) of the SwiGLU whose output gradient is dh + dh_term, and
    returns them in that order."""
    _check(dh, g, u)
    _launch(_swiglu_backward_kernel, g, (dh_term,), meta, dh, g, u, term_args=_term_args(dh_term, dh),
            DH_TERM=dh_term is not None)
    for t in (dh, g, u):  # Triton wrote them behind autograd's back: a later reader of the old values fails loudly
        torch.autograd.graph.increment_version(t)
    return dh, g, u

"""Gated MLP activations, h = act(g) * u with act SiLU (SwiGLU: Llama, Qwen, Mistral, Phi-3) or GELU's
tanh approximation (GeGLU: Gemma's gelu_pytorch_tanh), forward and backward, with the LoRA terms of the
projections around it added on the fly, and torch's roundings: act(g) is rounded to g's dtype before the
product (as `act_fn(gate) * up` computes it in two ops). On the GPU the plain SiLU kernels match torch bit
for bit in bf16; in fp16 a few elements differ by one ulp (Triton's exp vs CUDA's expf); GELU's tanh is
spelled with exp here (CUDA's tanhf there), so a few of its elements may differ by one ulp too.

The LoRA terms s * xa @ B^T of gate and up and of dh (backward) are added here, tile by tile
(kernels/low_rank.py), instead of by an in-place addmm_ over each (tokens x intermediate) tensor.
Forward reads the GEMMs' g and u and writes h. Backward reads dh, g and u, adds the same three terms
(the gate and up terms again, rounded as forward rounded them: writing g and u back with their terms
in forward would cost two more (tokens x intermediate) writes), recomputes h and overwrites g and u
with dg and du, so it needs no extra memory. Its programs own a band of columns over a chunk of rows, so
while dg, du and h are in registers they also sum the LoRA gradients that would otherwise be GEMMs
reading them back (dg^T @ xa_gate, du^T @ xa_up, h^T @ dy_b); h is never written. That holds up to
rank 32: the sums' registers narrow the bands as the rank grows, and narrow bands re-read the xa's from
L2 (measured on the H100 at 8192 x 14336: 0.51 ms at r=16, 1.72 at r=64, 5.04 at r=128, against 0.26 ms
for the three GEMMs at any of these ranks), so above it the kernel writes h over dh instead and the sums
are left to cuBLAS (swiglu_backward_writing_h_).
"""

import torch
import triton
import triton.language as tl

from .low_rank import (SWIGLU_META, LowRank, interpreter_blocks, launch_tiles, load_fp32, padded_rank, plus_low_rank,
                       shared_rank, takes_large_rank_tiles, term_args, tile)
from ._utils import INTERPRETING, cdiv, round_fp32_to, tanh

# swiglu_backward_'s launch: a band of BLOCK_N columns a program over one of ROW_CHUNKS chunks of the rows,
# BLOCK_M rows a step (bench/kernel_timings.py times BACKWARD_CANDIDATE_META, the default first, at r=16);
# at 4 warps the three (BLOCK_N, R) fp32 sums spill registers on sm_90, at 8 they fit
SWIGLU_BACKWARD_META = {"BLOCK_M": 32, "BLOCK_N": 64, "ROW_CHUNKS": 8, "num_warps": 8}
BACKWARD_CANDIDATE_META = [SWIGLU_BACKWARD_META, dict(SWIGLU_BACKWARD_META, ROW_CHUNKS=4),
                           dict(SWIGLU_BACKWARD_META, ROW_CHUNKS=16), dict(SWIGLU_BACKWARD_META, BLOCK_N=128),
                           dict(SWIGLU_BACKWARD_META, BLOCK_M=64)]


@triton.jit
def _gelu_tanh_term(g):
    """tanh(sqrt(2 / pi) (g + 0.044715 g^3)), as torch's tanh-approximated GELU computes it."""
    return tanh(0.7978845608028654 * (g + 0.044715 * (g * g * g)))


@triton.jit
def _activation(g, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, WIDE: tl.constexpr, GELU: tl.constexpr):
    """act(g) rounded to dtype and back to fp32 (kept in fp32 if WIDE), g in fp32. GELU as torch writes it:
    0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))."""
    if GELU:
        act = 0.5 * g * (1.0 + _gelu_tanh_term(g))
    else:
        act = g / (1.0 + tl.exp(-g))
    return _rounded_unless(act, dtype, SOFTWARE_RTNE, WIDE)


@triton.jit
def _activation_grad(g, d_act, GELU: tl.constexpr):
    """d_act * act'(g) in torch's order of operations (silu_backward, gelu_backward with tanh)."""
    if GELU:
        t = _gelu_tanh_term(g)
        right_derivative = (0.5 * g) * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * (g * g)))
        return d_act * (0.5 * (1.0 + t) + right_derivative)
    else:
        sig = 1.0 / (1.0 + tl.exp(-g))
        return d_act * sig * (1.0 + g * (1.0 - sig))


@triton.jit
def _rounded_unless(x, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, WIDE: tl.constexpr):
    """x rounded to dtype and back to fp32, or x itself if WIDE."""
    if WIDE:
        return x
    else:
        return round_fp32_to(x, dtype, SOFTWARE_RTNE).to(tl.float32)


@triton.jit(do_not_specialize=["n_rows"])  # packed batches change the token count every step
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, rank,
                           xa_g_ptr, b_g_ptr, s_g, g_sxm, g_sxr, g_sbn, g_sbr,
                           xa_u_ptr, b_u_ptr, s_u, u_sxm, u_sxr, u_sbn, u_sbr,
                           GATE_TERM: tl.constexpr, UP_TERM: tl.constexpr, R: tl.constexpr,
                           UPCAST_DOT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, WIDE: tl.constexpr,
                           GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           COLS_FAST: tl.constexpr):
    rows, cols, offs, mask = tile(n_rows, n_cols, n_cols, BLOCK_M, BLOCK_N, COLS_FAST)
    dtype: tl.constexpr = h_ptr.dtype.element_ty
    g = plus_low_rank(load_fp32(g_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_g_ptr, b_g_ptr,
                      s_g, g_sxm, g_sxr, g_sbn, g_sbr, GATE_TERM, R, UPCAST_DOT, SOFTWARE_RTNE, dtype, not WIDE)
    u = plus_low_rank(load_fp32(u_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_u_ptr, b_u_ptr,
                      s_u, u_sxm, u_sxr, u_sbn, u_sbr, UP_TERM, R, UPCAST_DOT, SOFTWARE_RTNE, dtype, not WIDE)
    act = _activation(g, dtype, SOFTWARE_RTNE, WIDE, GELU)
    tl.store(h_ptr + offs, round_fp32_to(act * u, dtype, SOFTWARE_RTNE), mask=mask)


@triton.jit
def _backward_tile(dh_ptr, g_ptr, u_ptr, rows, cols, offs, mask, n_rows, n_cols, rank,
                   xa_ptr, b_ptr, scale, stride_xm, stride_xr, stride_bn, stride_br,
                   xa_g_ptr, b_g_ptr, s_g, g_sxm, g_sxr, g_sbn, g_sbr,
                   xa_u_ptr, b_u_ptr, s_u, u_sxm, u_sxr, u_sbn, u_sbr, R: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   SOFTWARE_RTNE: tl.constexpr, WIDE: tl.constexpr, GELU: tl.constexpr, TERMS: tl.constexpr):
    """(h, dg, du) of a tile, rounded to dh's dtype: the sums with their terms (where TERMS) rounded as
    forward rounded them, act(g) rounded before its products as torch rounds it."""
    dtype: tl.constexpr = dh_ptr.dtype.element_ty
    dh = plus_low_rank(load_fp32(dh_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_ptr, b_ptr, scale,
                       stride_xm, stride_xr, stride_bn, stride_br, TERMS, R, UPCAST_DOT, SOFTWARE_RTNE, dtype,
                       not WIDE)
    g = plus_low_rank(load_fp32(g_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_g_ptr, b_g_ptr,
                      s_g, g_sxm, g_sxr, g_sbn, g_sbr, TERMS, R, UPCAST_DOT, SOFTWARE_RTNE, dtype, not WIDE)
    u = plus_low_rank(load_fp32(u_ptr, offs, mask), rows, cols, n_rows, n_cols, rank, xa_u_ptr, b_u_ptr,
                      s_u, u_sxm, u_sxr, u_sbn, u_sbr, TERMS, R, UPCAST_DOT, SOFTWARE_RTNE, dtype, not WIDE)
    act = _activation(g, dtype, SOFTWARE_RTNE, WIDE, GELU)
    dg = _activation_grad(g, _rounded_unless(dh * u, dtype, SOFTWARE_RTNE, WIDE), GELU)
    return (round_fp32_to(act * u, dtype, SOFTWARE_RTNE), round_fp32_to(dg, dtype, SOFTWARE_RTNE),
            round_fp32_to(dh * act, dtype, SOFTWARE_RTNE))


@triton.jit
def _rows_t_times(a, xa_ptr, rows, n_rows, rank, stride_xm, stride_xr, R: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a^T @ xa[rows], (BLOCK_N, R) in fp32, xa's columns past the rank read as zeros."""
    r = tl.arange(0, R)
    xa = tl.load(xa_ptr + rows[:, None] * stride_xm + r[None, :] * stride_xr,
                 mask=(rows[:, None] < n_rows) & (r[None, :] < rank), other=0.0)
    if UPCAST_DOT:
        return tl.dot(tl.trans(a).to(tl.float32), xa.to(tl.float32), input_precision="ieee")
    return tl.dot(tl.trans(a), xa)


@triton.jit(do_not_specialize=["n_rows", "chunk_rows"])
def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, sums_ptr, n_rows, n_cols, rank, chunk_rows,
                            xa_ptr, b_ptr, scale, stride_xm, stride_xr, stride_bn, stride_br,
                            xa_g_ptr, b_g_ptr, s_g, g_sxm, g_sxr, g_sbn, g_sbr,
                            xa_u_ptr, b_u_ptr, s_u, u_sxm, u_sxr, u_sbn, u_sbr,
                            R: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr,
                            WIDE: tl.constexpr, GELU: tl.constexpr, SUMS: tl.constexpr, TERMS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A band of BLOCK_N columns over one chunk of chunk_rows rows: g_ptr <- dg, u_ptr <- du in place. With
    # SUMS, h is never written and sums (3, chunks, n_cols, R) fp32 <- this chunk's dg^T @ xa_g,
    # du^T @ xa_u and h^T @ dy_b (dy_b: the dh term's xa), from dg, du and h rounded as they are written;
    # without, dh_ptr <- h (each element's dh is read before its h is written, by the same program).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1).to(tl.int64) * chunk_rows
    gate_sum = tl.zeros((BLOCK_N, R), tl.float32)
    up_sum = tl.zeros((BLOCK_N, R), tl.float32)
    down_sum = tl.zeros((BLOCK_N, R), tl.float32)
    for m in range(0, chunk_rows, BLOCK_M):
        rows = start + m + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None] * n_cols + cols[None, :]
        h, dg, du = _backward_tile(dh_ptr, g_ptr, u_ptr, rows, cols, offs, mask, n_rows, n_cols, rank,
                                   xa_ptr, b_ptr, scale, stride_xm, stride_xr, stride_bn, stride_br,
                                   xa_g_ptr, b_g_ptr, s_g, g_sxm, g_sxr, g_sbn, g_sbr,
                                   xa_u_ptr, b_u_ptr, s_u, u_sxm, u_sxr, u_sbn, u_sbr,
                                   R, UPCAST_DOT, SOFTWARE_RTNE, WIDE, GELU, TERMS)
        tl.store(g_ptr + offs, dg, mask=mask)
        tl.store(u_ptr + offs, du, mask=mask)
        if SUMS:
            gate_sum += _rows_t_times(dg, xa_g_ptr, rows, n_rows, rank, g_sxm, g_sxr, R, UPCAST_DOT)
            up_sum += _rows_t_times(du, xa_u_ptr, rows, n_rows, rank, u_sxm, u_sxr, R, UPCAST_DOT)
            down_sum += _rows_t_times(h, xa_ptr, rows, n_rows, rank, stride_xm, stride_xr, R, UPCAST_DOT)
        else:
            tl.store(dh_ptr + offs, h, mask=mask)
    if SUMS:
        r = tl.arange(0, R)
        chunk_stride = n_cols * R
        out = sums_ptr + tl.program_id(1) * chunk_stride + cols[:, None] * R + r[None, :]
        out_mask = cols[:, None] < n_cols
        tl.store(out, gate_sum, mask=out_mask)
        tl.store(out + tl.num_programs(1) * chunk_stride, up_sum, mask=out_mask)
        tl.store(out + 2 * tl.num_programs(1) * chunk_stride, down_sum, mask=out_mask)


def _check(*tensors):
    first = tensors[0]
    for t in tensors:
        if t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous():
            raise ValueError("swiglu: inputs must be contiguous tensors of one shape and dtype")


# The backward's registers hold three (BLOCK_N, R) fp32 sums, (BLOCK_M, R) tiles of the xa's and
# (R, BLOCK_N) tiles of the B's. At 8 warps ptxas spills none on sm_90 up to BLOCK_N * R = 2048 with the
# sums (4096 without) and BLOCK_M * R = 1024 (rows x columns, with the sums: r=32 at 32 x 64, r=64 at
# 16 x 32, r=128 at 16 x 16; tests/kernels/hopper_compile.py); beyond, it spills (with the sums, 240 bytes
# a thread at r=64 with r=16's tiles, 1016 at r=128; without, 256 at r=128 in 16 x 64), so larger ranks
# take narrower tiles.
_SUMS_BUDGET, _B_TILES_BUDGET, _XA_BUDGET, _SMALLEST_BLOCK = 2048, 4096, 1024, 16


def _blocks_for_rank(block_m: int, block_n: int, r_pad: int, sums: bool) -> tuple[int, int]:
    columns_budget = _SUMS_BUDGET if sums else _B_TILES_BUDGET
    rows_budget = _XA_BUDGET
    if not sums and takes_large_rank_tiles(r_pad):
        block_m, rows_budget = LARGE_RANK_BACKWARD_BLOCK_M, _LARGE_RANK_XA_BUDGET
    while block_n > _SMALLEST_BLOCK and block_n * r_pad > columns_budget:
        block_n //= 2
    while block_m > _SMALLEST_BLOCK and block_m * r_pad > rows_budget:
        block_m //= 2
    return block_m, block_n


# Above SMALL_RANK_MAX (kernels/low_rank.py) the kernels are bound by their rank-r products, whose B tiles
# each program loads for its rows: taller tiles load them once for more rows. Measured on the H100 at
# 8192 x 14336 with the prepared recipe's fp32 sums (bench/RESULTS.md, session 20): the forward 0.411 ->
# 0.369 ms at r=64 and 0.640 -> 0.410 at r=128 in 64 x 64 tiles; the h-writing backward (no sums, so its
# xa tiles may be taller) 1.031 -> 0.894 ms at r=64 in 32 x 64 tiles (64 x 64: 1.064). Spill-free on sm_90
# (tests/kernels/hopper_compile.py); at r=128 the backward keeps 16 x 32 tiles, since 32 x 32 spills.
LARGE_RANK_FORWARD_META = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}
LARGE_RANK_BACKWARD_BLOCK_M, _LARGE_RANK_XA_BUDGET = 32, 2048


ACTIVATIONS = ("silu", "gelu_tanh")


def _is_gelu(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"swiglu: activation {activation!r} is not one of {ACTIVATIONS}")
    return activation == "gelu_tanh"


def _forward_meta(terms) -> dict:
    return LARGE_RANK_FORWARD_META if takes_large_rank_tiles(shared_rank(terms)) else SWIGLU_META


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, gate_term: LowRank | None = None,
                   up_term: LowRank | None = None, meta: dict | None = None, wide: bool = False,
                   activation: str = "silu") -> torch.Tensor:
    """act(g + gate_term) * (u + up_term) in g's dtype, each sum rounded once (as addmm_ would); with
    `wide`, the sums and act stay fp32 and only h is rounded (as stock computes an MLP whose input is
    fp32: fp32 gate and up outputs, cast to the compute dtype at the down projection's input). `activation`:
    one of ACTIVATIONS."""
    _check(g, u)
    h = torch.empty_like(g)
    terms = (*term_args(gate_term, g), *term_args(up_term, u))
    launch_tiles(_swiglu_forward_kernel, g.view(-1, g.shape[-1]), (gate_term, up_term),
                 meta or _forward_meta((gate_term, up_term)), g, u, h,
                 term_args=terms, GATE_TERM=gate_term is not None, UP_TERM=up_term is not None, WIDE=wide,
                 GELU=_is_gelu(activation))
    return h


# The largest padded rank whose gradients swiglu_backward_ sums in the kernel; above it
# swiglu_backward_writing_h_ and cuBLAS (module docstring).
SUMS_MAX_RANK = 32


def sums_in_kernel(*terms: LowRank) -> bool:
    """Whether the backward with these LoRA terms sums their gradients in the kernel (swiglu_backward_)
    rather than writing h for GEMMs (swiglu_backward_writing_h_)."""
    return padded_rank(shared_rank(terms)) <= SUMS_MAX_RANK


def _launch_backward(dh, g, u, terms, meta, wide, activation, sums: bool):
    """Overwrites g and u with dg and du (and dh with h without `sums`); with `sums`, returns the three
    (cols, rank) fp32 sums, the chunks' partial sums added in a fixed order."""
    _check(dh, g, u)
    with_terms = terms[0] is not None
    if any((t is not None) != with_terms for t in terms) or (sums and not with_terms):
        raise ValueError("swiglu backward: the dh, gate and up terms go together (and the summing launch "
                         "needs them)")
    rows, cols = g.numel() // g.shape[-1], g.shape[-1]
    args = (*term_args(terms[0], dh), *term_args(terms[1], g), *term_args(terms[2], u))
    rank = shared_rank(terms)
    r_pad = padded_rank(rank)
    block_m, block_n = _blocks_for_rank(meta["BLOCK_M"], meta["BLOCK_N"], r_pad, sums)
    chunks = meta["ROW_CHUNKS"]
    if INTERPRETING:
        (block_m, block_n), chunks = interpreter_blocks(cols), 1
    chunk_rows = cdiv(cdiv(rows, chunks), block_m) * block_m
    chunks = cdiv(rows, chunk_rows)
    partial = torch.empty(3, chunks, cols, r_pad, dtype=torch.float32, device=g.device) if sums else dh
    _swiglu_backward_kernel[(cdiv(cols, block_n), chunks)](
        dh, g, u, partial, rows, cols, rank, chunk_rows, *args, R=r_pad,
        UPCAST_DOT=INTERPRETING or g.dtype == torch.float32, SOFTWARE_RTNE=INTERPRETING, WIDE=wide,
        GELU=_is_gelu(activation), SUMS=sums, TERMS=with_terms, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=meta["num_warps"])
    for t in (g, u) if sums else (dh, g, u):  # written behind autograd's back: a later reader of the old values fails loudly
        torch.autograd.graph.increment_version(t)
    return partial.sum(1)[..., :rank] if sums else None


def swiglu_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dh_term: LowRank, gate_term: LowRank,
                     up_term: LowRank, meta: dict = SWIGLU_BACKWARD_META, wide: bool = False,
                     activation: str = "silu"):
    """The backward of h = act(g + gate_term) * (u + up_term) whose output gradient is dh + dh_term:
    overwrites g and u with dg and du (dh is left as it is; h is recomputed, never written) and returns
    (dg, du, (gate_sum, up_sum, down_sum)), the (cols, r) fp32 sums dg^T @ gate_term.xa, du^T @ up_term.xa
    and h^T @ dh_term.xa (unscaled): the gate and up B gradients and the transposed down A gradient over
    their scalings, from dg, du and h rounded to dh's dtype as autograd's tensors are. Each program sums a
    band of columns over a chunk of rows; the chunks' sums are added in a fixed order (no atomics, the
    same bits every run). `wide` and `activation` as in swiglu_forward. Fast up to SUMS_MAX_RANK."""
    gate_sum, up_sum, down_sum = _launch_backward(dh, g, u, (dh_term, gate_term, up_term), meta, wide, activation,
                                                  sums=True)
    return g, u, (gate_sum, up_sum, down_sum)


def swiglu_backward_writing_h_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dh_term: LowRank | None = None,
                               gate_term: LowRank | None = None, up_term: LowRank | None = None,
                               meta: dict = SWIGLU_BACKWARD_META, wide: bool = False, activation: str = "silu"):
    """swiglu_backward_ for ranks above SUMS_MAX_RANK: overwrites dh, g and u with h, dg and du (rounded
    as swiglu_backward_ rounds them) and returns (dg, du, h), for the LoRA gradients' GEMMs. Without
    terms (all three None: the projections' GEMMs carried them), the backward of h = act(g) * u."""
    _launch_backward(dh, g, u, (dh_term, gate_term, up_term), meta, wide, activation, sums=False)
    return g, u, dh

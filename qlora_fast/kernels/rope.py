"""Rotary position embedding of q and k in one launch, forward and backward, with torch's roundings:
q * cos and rotate_half(q) * sin are each rounded to q's dtype before their sum, as transformers'
`apply_rotary_pos_emb` computes them in separate ops.

q and k are (batch, heads, seq, head_dim) views in any strides (attention transposes them); cos and sin
are (batch or 1, seq, head_dim). One program per (batch, position) on the GPU rotates every head of q and k
there, reading that position's cos and sin once. Backward is the same rotation with -sin: the transpose of
x -> x * cos + rotate_half(x) * sin is g -> g * cos + rotate_half(g * sin)^T, rotate_half^T(y) = (y2, -y1).

The output may be narrower than q (fp32 q of a model `prepare_model_for_kbit_training` upcast, written in
the bf16 its attention rounds it to) and the gradient wider than the output gradient (that q's fp32
gradient of a bf16 one): the products are then rounded as in the wider dtype, stock's, and the result once
to the output's.

`rope_plus_low_rank` rotates q and k where a fused q/k/v Function makes them (ops/lora_nf4_qkv.py): it
reads the base projection outputs and adds their LoRA terms first, as kernels/low_rank_add.py does, so q
and k are read and written once between the base GEMM and attention instead of three times.
"""

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING, cdiv, next_power_of_2
from ._utils import round_fp32_to
from .low_rank import LowRank, padded_rank, plus_low_rank, takes_large_rank_tiles


@triton.jit
def _rotated(x1, x2, c1, c2, s1, s2, BACKWARD: tl.constexpr, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr):
    """The halves of x rotated (BACKWARD: by the transpose), fp32, each product rounded to `dtype` before
    the sum as torch rounds them: forward x * cos + (-x2 * s1, x1 * s2), backward g * cos + (g2 * s2, -g1 * s1)."""
    a1 = round_fp32_to(x1 * c1, dtype, SOFTWARE_RTNE).to(tl.float32)
    a2 = round_fp32_to(x2 * c2, dtype, SOFTWARE_RTNE).to(tl.float32)
    if BACKWARD:
        y1 = a1 + round_fp32_to(x2 * s2, dtype, SOFTWARE_RTNE).to(tl.float32)
        y2 = a2 - round_fp32_to(x1 * s1, dtype, SOFTWARE_RTNE).to(tl.float32)
    else:
        y1 = a1 - round_fp32_to(x2 * s1, dtype, SOFTWARE_RTNE).to(tl.float32)
        y2 = a2 + round_fp32_to(x1 * s2, dtype, SOFTWARE_RTNE).to(tl.float32)
    return y1, y2


@triton.jit
def _rotate_heads(x_ptr, out_ptr, batch, pos, half_mask, x_strides, out_strides, n_heads, c1, c2, s1, s2,
                  BACKWARD: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr,
                  HALF_BLOCK: tl.constexpr, FP32_PRODUCTS: tl.constexpr):
    """Rotates all heads of x at the (batch, pos) rows, each (ROWS, 1, 1); c1/c2, s1/s2: cos and sin of
    each half, fp32 (ROWS, 1, HALF_BLOCK), half_mask: the rows' and the half's valid elements. The products
    are rounded to the output's dtype, or (FP32_PRODUCTS) to fp32."""
    stride_b, stride_h, stride_s, stride_d = x_strides
    out_b, out_h, out_s, out_d = out_strides
    heads = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, HALF_BLOCK)[None, None, :]
    mask = half_mask & (heads < n_heads)
    base = x_ptr + batch * stride_b + pos * stride_s + heads * stride_h
    x1 = tl.load(base + d * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + (d + HALF) * stride_d, mask=mask, other=0.0).to(tl.float32)
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    dtype: tl.constexpr = tl.float32 if FP32_PRODUCTS else out_dtype
    y1, y2 = _rotated(x1, x2, c1, c2, s1, s2, BACKWARD, dtype, SOFTWARE_RTNE)
    out = out_ptr + batch * out_b + pos * out_s + heads * out_h
    tl.store(out + d * out_d, round_fp32_to(y1, out_dtype, SOFTWARE_RTNE), mask=mask)
    tl.store(out + (d + HALF) * out_d, round_fp32_to(y2, out_dtype, SOFTWARE_RTNE), mask=mask)


# Packed batches change the sequence length every step, and with it the batch strides.
@triton.jit(do_not_specialize=["n_rows", "seq_len", "qs_b", "ks_b", "qo_b", "ko_b", "cs_b", "qs_h", "ks_h", "qo_h",
                              "ko_h", "qs_s", "ks_s", "qo_s", "ko_s", "cs_s"])
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, n_rows, seq_len, q_heads, k_heads,
                 qs_b, qs_h, qs_s, qs_d, ks_b, ks_h, ks_s, ks_d,
                 qo_b, qo_h, qo_s, qo_d, ko_b, ko_h, ko_s, ko_d,
                 cs_b, cs_s, cs_d,
                 BACKWARD: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, ROWS: tl.constexpr,
                 Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                 FP32_PRODUCTS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None, None]
    batch = rows // seq_len
    pos = rows % seq_len
    d = tl.arange(0, HALF_BLOCK)[None, None, :]
    # half a head is padded to a power of two where it is none (Phi-3's 96-wide heads: 48 -> 64)
    mask = rows < n_rows
    if HALF_BLOCK != HALF:
        mask = mask & (d < HALF)
    trig = batch * cs_b + pos * cs_s
    c1 = tl.load(cos_ptr + trig + d * cs_d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trig + (d + HALF) * cs_d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig + d * cs_d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + (d + HALF) * cs_d, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, batch, pos, mask, (qs_b, qs_h, qs_s, qs_d), (qo_b, qo_h, qo_s, qo_d),
                  q_heads, c1, c2, s1, s2, BACKWARD, SOFTWARE_RTNE, Q_HEADS, HALF, HALF_BLOCK, FP32_PRODUCTS)
    _rotate_heads(k_ptr, k_out_ptr, batch, pos, mask, (ks_b, ks_h, ks_s, ks_d), (ko_b, ko_h, ko_s, ko_d),
                  k_heads, c1, c2, s1, s2, BACKWARD, SOFTWARE_RTNE, K_HEADS, HALF, HALF_BLOCK, FP32_PRODUCTS)


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out_dtype: torch.dtype | None = None):
    """(q_embed, k_embed) for (batch, heads, seq, head_dim) q and k and (batch, seq, head_dim) cos and sin, in
    `out_dtype` (default: q's; narrower than fp32 q: stock's fp32 result rounded once)."""
    out_dtype = out_dtype or q.dtype
    outs = torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)
    return _rope(q, k, cos, sin, outs, backward=False, fp32_products=torch.float32 in (q.dtype, out_dtype))


def rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  out_dtype: torch.dtype | None = None, outs: tuple | None = None, wide_inputs: bool = False):
    """The input gradients of rope_forward for output gradients grad_q and grad_k, in `out_dtype` (default:
    theirs; the inputs' dtype where rope_forward narrowed them), or written into `outs` (two tensors of
    grad_q's and grad_k's shapes, any strides). `wide_inputs`: the forward's inputs were fp32 (its products
    were), whatever dtype the gradients are written in."""
    if outs is None:
        out_dtype = out_dtype or grad_q.dtype
        outs = torch.empty_like(grad_q, dtype=out_dtype), torch.empty_like(grad_k, dtype=out_dtype)
    fp32_products = wide_inputs or torch.float32 in (grad_q.dtype, outs[0].dtype)
    return _rope(grad_q, grad_k, cos, sin, outs, backward=True, fp32_products=fp32_products)


def _batch_wide(cos: torch.Tensor, sin: torch.Tensor, batch: int, seq_len: int, head_dim: int):
    """cos and sin as (batch, seq_len, head_dim), checked."""
    if cos.shape[0] == 1:  # one set of positions for the whole batch (no position_ids given)
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    if head_dim % 2 or cos.shape != (batch, seq_len, head_dim) or sin.stride() != cos.stride():
        raise ValueError(f"rope: an even head_dim and cos, sin of shape {(batch, seq_len, head_dim)} "
                         f"with one layout; got head_dim {head_dim}, cos {tuple(cos.shape)}")
    return cos, sin


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, outs: tuple, backward: bool,
          fp32_products: bool):
    batch, q_heads, seq_len, head_dim = q.shape
    k_heads = k.shape[1]
    cos, sin = _batch_wide(cos, sin, batch, seq_len, head_dim)
    q_out, k_out = outs
    if q_out.shape != q.shape or k_out.shape != k.shape or q_out.dtype != k_out.dtype:
        raise ValueError(f"rope: outputs of shapes {tuple(q.shape)}, {tuple(k.shape)} and one dtype needed")
    n_rows = batch * seq_len
    q_block, k_block = next_power_of_2(q_heads), next_power_of_2(k_heads)
    half_block = next_power_of_2(head_dim // 2)
    rows = max(1, INTERPRETER_TILE // (q_block * 2 * half_block)) if INTERPRETING else 1
    _rope_kernel[(cdiv(n_rows, rows),)](
        q, k, cos, sin, q_out, k_out, n_rows, seq_len, q_heads, k_heads,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(),
        BACKWARD=backward, SOFTWARE_RTNE=INTERPRETING, ROWS=rows, Q_HEADS=q_block, K_HEADS=k_block,
        HALF=head_dim // 2, HALF_BLOCK=half_block, FP32_PRODUCTS=fp32_products,
        enable_fp_fusion=False,  # else the compiler fuses a product into the sum as one fma, unrounded
    )
    return q_out, k_out


# The rows of one program of rope_plus_low_rank on the GPU: its term is a (BLOCK_M, r) x (r, head_dim / 2)
# tensor-core product per half. 32 rows / 4 warps: the fastest of four candidates on the H100, by ~1% of the
# fused q/k/v's forward + backward (bench/RESULTS.md, session 15).
ROPE_LORA_META = {"BLOCK_M": 32, "num_warps": 4}
ROPE_LORA_LARGE_RANK_META = {"BLOCK_M": 64, "num_warps": 4}  # above kernels/low_rank.py SMALL_RANK_MAX


@triton.jit(do_not_specialize=["n_rows", "seq_len"])
def _rope_lora_kernel(y_ptr, stride_y, out_ptr, stride_out, n_rows, seq_len, q_heads,
                      xa_ptr, stride_xm, stride_xr, b_ptr, stride_bn, stride_br, rank, scale_q, scale_k,
                      cos_ptr, sin_ptr, FP32_Q: tl.constexpr, SHARED_POSITIONS: tl.constexpr, R: tl.constexpr,
                      HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST_DOT: tl.constexpr,
                      SOFTWARE_RTNE: tl.constexpr):
    # Heads run fastest along the grid: programs launched together share their rows' cos and sin in L2.
    head = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HALF_BLOCK)  # half a head, padded to a power of two where it is none
    mask = rows[:, None] < n_rows
    if HALF_BLOCK != HALF:
        mask = mask & (d[None, :] < HALF)
    is_k = (head >= q_heads).to(tl.int32)
    # k's term: the rank columns of xa after q's, scaled by k's scaling; B holds q's rows then k's
    xa_head = xa_ptr + is_k * rank * stride_xr
    scale = tl.where(head < q_heads, scale_q, scale_k)
    b_head = b_ptr + head * (2 * HALF) * stride_bn
    y_head = y_ptr + rows[:, None] * stride_y + head * (2 * HALF) + d[None, :]
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    # stock's q (before RoPE): base + term rounded once to q's dtype, which is the output's unless q is fp32
    # (a prepared model's, whose attention takes it narrower: the sum and the products then stay fp32)
    dtype: tl.constexpr = tl.float32 if FP32_Q else out_dtype
    x1 = plus_low_rank(tl.load(y_head, mask=mask, other=0.0).to(tl.float32), rows, d, n_rows, HALF, rank, xa_head,
                       b_head, scale, stride_xm, stride_xr, stride_bn, stride_br, True, R, UPCAST_DOT, SOFTWARE_RTNE,
                       dtype)
    x2 = plus_low_rank(tl.load(y_head + HALF, mask=mask, other=0.0).to(tl.float32), rows, d, n_rows, HALF, rank,
                       xa_head, b_head + HALF * stride_bn, scale, stride_xm, stride_xr, stride_bn, stride_br, True, R,
                       UPCAST_DOT, SOFTWARE_RTNE, dtype)
    # cos and sin contiguous, (batch, seq, head_dim) row by row, or (1, seq, head_dim) for every batch
    positions = rows % seq_len if SHARED_POSITIONS else rows
    trig = positions[:, None] * (2 * HALF) + d[None, :]
    c1 = tl.load(cos_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _rotated(x1, x2, c1, c2, s1, s2, False, dtype, SOFTWARE_RTNE)
    out_head = out_ptr + rows[:, None] * stride_out + head * (2 * HALF) + d[None, :]
    tl.store(out_head, round_fp32_to(y1, out_dtype, SOFTWARE_RTNE), mask=mask)
    tl.store(out_head + HALF, round_fp32_to(y2, out_dtype, SOFTWARE_RTNE), mask=mask)


def rope_plus_low_rank(y: torch.Tensor, q_term: LowRank, k_term: LowRank, cos: torch.Tensor, sin: torch.Tensor,
                       seq_len: int, out: torch.Tensor, q_dtype: torch.dtype) -> torch.Tensor:
    """RoPE of (y + LoRA terms) for the q and k projections' outputs, written into `out` (may be y).

    y: the (tokens, q_width + k_width) base outputs of q then k, tokens in (batch, seq_len) order, unit
    column stride; q_term, k_term: their LoRA terms, of one rank, xa column blocks of one tensor (k's right
    after q's) and B row blocks of one buffer (k's right after q's); cos, sin: (batch or 1, seq_len,
    head_dim). Computes what stock computes where the projections' output dtype is `q_dtype`: base + term
    rounded to q_dtype, rotated with torch's roundings in q_dtype, rounded once to out's dtype (narrower
    only where q_dtype is fp32)."""
    tokens, width = y.shape
    head_dim = cos.shape[-1]
    q_width = q_term.b.shape[0]
    rank = q_term.xa.shape[1]
    b = q_term.b.as_strided((width, rank), q_term.b.stride())
    shared_positions = cos.shape[0] == 1
    _batch_wide(cos, sin, tokens // seq_len, seq_len, head_dim)  # checks the shapes
    cos, sin = cos.contiguous(), sin.contiguous()
    if (out.shape != y.shape or y.stride(1) != 1 or out.stride(1) != 1 or width % head_dim
            or q_width % head_dim or head_dim < 32 or k_term.xa.shape[1] != rank
            or k_term.xa.data_ptr() != q_term.xa.data_ptr() + rank * q_term.xa.stride(1) * q_term.xa.element_size()
            or k_term.b.data_ptr() != q_term.b.data_ptr() + q_width * q_term.b.stride(0) * q_term.b.element_size()
            or k_term.b.stride() != q_term.b.stride() or (q_dtype != torch.float32 and out.dtype != q_dtype)):
        raise ValueError("rope_plus_low_rank: heads at least 32 wide, q's and k's outputs side by side in y and "
                         "out, their terms of one rank with adjacent xa columns and B rows, and out in q's dtype "
                         "unless q is fp32")
    launch = ROPE_LORA_LARGE_RANK_META if takes_large_rank_tiles(rank) else ROPE_LORA_META
    block_m = max(16, INTERPRETER_TILE // next_power_of_2(head_dim)) if INTERPRETING else launch["BLOCK_M"]
    meta = {} if INTERPRETING else {"num_warps": launch["num_warps"]}
    _rope_lora_kernel[(width // head_dim, cdiv(tokens, block_m))](
        y, y.stride(0), out, out.stride(0), tokens, seq_len, q_width // head_dim,
        q_term.xa, *q_term.xa.stride(), b, *b.stride(), rank, float(q_term.scale), float(k_term.scale),
        cos, sin, FP32_Q=q_dtype == torch.float32, SHARED_POSITIONS=shared_positions,
        R=padded_rank(rank), HALF=head_dim // 2, HALF_BLOCK=next_power_of_2(head_dim // 2), BLOCK_M=block_m,
        UPCAST_DOT=INTERPRETING or y.dtype == torch.float32, SOFTWARE_RTNE=INTERPRETING,
        enable_fp_fusion=False,  # the products are rounded before their sums, as torch's are
        **meta,
    )
    torch.autograd.graph.increment_version(out)
    return out

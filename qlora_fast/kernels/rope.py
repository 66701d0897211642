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
"""

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING, cdiv, next_power_of_2
from ._utils import round_fp32_to


@triton.jit
def _rotate_heads(x_ptr, out_ptr, batch, pos, row_mask, x_strides, out_strides, n_heads, c1, c2, s1, s2,
                  BACKWARD: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr,
                  FP32_PRODUCTS: tl.constexpr):
    """Rotates all heads of x at the (batch, pos) rows, each (ROWS, 1, 1); c1/c2, s1/s2: cos and sin of
    each half, fp32 (ROWS, 1, HALF). The products are rounded to the output's dtype, or (FP32_PRODUCTS)
    to fp32."""
    stride_b, stride_h, stride_s, stride_d = x_strides
    out_b, out_h, out_s, out_d = out_strides
    heads = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, HALF)[None, None, :]
    mask = row_mask & (heads < n_heads)
    base = x_ptr + batch * stride_b + pos * stride_s + heads * stride_h
    x1 = tl.load(base + d * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + (d + HALF) * stride_d, mask=mask, other=0.0).to(tl.float32)
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    dtype: tl.constexpr = tl.float32 if FP32_PRODUCTS else out_dtype
    a1 = round_fp32_to(x1 * c1, dtype, SOFTWARE_RTNE).to(tl.float32)
    a2 = round_fp32_to(x2 * c2, dtype, SOFTWARE_RTNE).to(tl.float32)
    if BACKWARD:  # g * cos + (g2 * s2, -(g1 * s1))
        y1 = a1 + round_fp32_to(x2 * s2, dtype, SOFTWARE_RTNE).to(tl.float32)
        y2 = a2 - round_fp32_to(x1 * s1, dtype, SOFTWARE_RTNE).to(tl.float32)
    else:  # x * cos + (-x2 * s1, x1 * s2)
        y1 = a1 - round_fp32_to(x2 * s1, dtype, SOFTWARE_RTNE).to(tl.float32)
        y2 = a2 + round_fp32_to(x1 * s2, dtype, SOFTWARE_RTNE).to(tl.float32)
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
                 Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr, FP32_PRODUCTS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None, None]
    row_mask = rows < n_rows
    batch = rows // seq_len
    pos = rows % seq_len
    d = tl.arange(0, HALF)[None, None, :]
    trig = batch * cs_b + pos * cs_s
    c1 = tl.load(cos_ptr + trig + d * cs_d, mask=row_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + trig + (d + HALF) * cs_d, mask=row_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + trig + d * cs_d, mask=row_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + trig + (d + HALF) * cs_d, mask=row_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, batch, pos, row_mask, (qs_b, qs_h, qs_s, qs_d), (qo_b, qo_h, qo_s, qo_d),
                  q_heads, c1, c2, s1, s2, BACKWARD, SOFTWARE_RTNE, Q_HEADS, HALF, FP32_PRODUCTS)
    _rotate_heads(k_ptr, k_out_ptr, batch, pos, row_mask, (ks_b, ks_h, ks_s, ks_d), (ko_b, ko_h, ko_s, ko_d),
                  k_heads, c1, c2, s1, s2, BACKWARD, SOFTWARE_RTNE, K_HEADS, HALF, FP32_PRODUCTS)


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out_dtype: torch.dtype | None = None):
    """(q_embed, k_embed) for (batch, heads, seq, head_dim) q and k and (batch, seq, head_dim) cos and sin, in
    `out_dtype` (default: q's; narrower than fp32 q: stock's fp32 result rounded once)."""
    return _rope(q, k, cos, sin, backward=False, out_dtype=out_dtype or q.dtype)


def rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  out_dtype: torch.dtype | None = None):
    """The input gradients of rope_forward for output gradients grad_q and grad_k, in `out_dtype` (default:
    theirs; the inputs' dtype where rope_forward narrowed them)."""
    return _rope(grad_q, grad_k, cos, sin, backward=True, out_dtype=out_dtype or grad_q.dtype)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
          out_dtype: torch.dtype):
    batch, q_heads, seq_len, head_dim = q.shape
    k_heads = k.shape[1]
    if cos.shape[0] == 1:  # one set of positions for the whole batch (no position_ids given)
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    if head_dim & (head_dim - 1) or cos.shape != (batch, seq_len, head_dim) or sin.stride() != cos.stride():
        raise ValueError(f"rope: head_dim a power of two and cos, sin of shape {(batch, seq_len, head_dim)} "
                         f"with one layout; got head_dim {head_dim}, cos {tuple(cos.shape)}")
    q_out, k_out = torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)
    n_rows = batch * seq_len
    q_block, k_block = next_power_of_2(q_heads), next_power_of_2(k_heads)
    rows = max(1, INTERPRETER_TILE // (q_block * head_dim)) if INTERPRETING else 1
    _rope_kernel[(cdiv(n_rows, rows),)](
        q, k, cos, sin, q_out, k_out, n_rows, seq_len, q_heads, k_heads,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(),
        BACKWARD=backward, SOFTWARE_RTNE=INTERPRETING, ROWS=rows, Q_HEADS=q_block, K_HEADS=k_block,
        HALF=head_dim // 2, FP32_PRODUCTS=torch.float32 in (q.dtype, out_dtype),
        enable_fp_fusion=False,  # else the compiler fuses a product into the sum as one fma, unrounded
    )
    return q_out, k_out

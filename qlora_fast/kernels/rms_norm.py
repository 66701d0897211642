"""RMSNorm forward and input-gradient, one row per program, as Llama/Mistral/Qwen2 compute it:
y = w * round(x * rsqrt(mean(x^2) + eps)) with the mean in fp32 and the normalized row rounded to x's dtype
before the weight multiplies it; or, with OFFSET_WEIGHT, as Gemma's: round(x * rsqrt(mean(x^2) + eps) *
(1 + w)), all in fp32 and rounded once to x's dtype. The weight is frozen (QLoRA trains only adapters), so
backward gives dX.

A decoder layer normalizes the sum of its residual and a sublayer's output, and that sum's gradient is
the norm's input gradient plus the one it gets straight from the residual path. The kernels take both
additions in (HAS_DELTA forward, HAS_RESIDUAL_GRAD backward), rounding each as torch's separate add would,
so neither costs a pass over the hidden states of its own. The delta may be narrower than x (a bf16
sublayer output added to the fp32 residual stream of a model `prepare_model_for_kbit_training` upcast):
it is widened exactly and the sum rounded once to x's dtype, as torch's promoting add computes it.
"""

import functools

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING, cdiv, next_power_of_2
from ._utils import round_fp32_to


@triton.jit
def _row_tile(n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ROWS rows: their indices, the (ROWS, BLOCK) element offsets and mask."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, rows[:, None] * n_cols + cols[None, :], mask


@triton.jit
def _weight(w_ptr, n_cols, OFFSET_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """The fp32 factor each column is scaled by: w, or 1 + w (Gemma)."""
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if OFFSET_WEIGHT:
        w = 1.0 + w
    return w


@triton.jit(do_not_specialize=["n_rows"])  # packed batches change the token count every step
def _rms_norm_forward_kernel(x_ptr, delta_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps,
                             HAS_DELTA: tl.constexpr, OFFSET_WEIGHT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, offs, mask = _row_tile(n_rows, n_cols, ROWS, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:  # normalize sum = round(x + delta), and write it: it is the layer's next residual
        delta = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rounded_sum = round_fp32_to(x + delta, sum_ptr.dtype.element_ty, SOFTWARE_RTNE)
        tl.store(sum_ptr + offs, rounded_sum, mask=mask)
        x = rounded_sum.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if not OFFSET_WEIGHT:
        normed = round_fp32_to(normed, x_ptr.dtype.element_ty, SOFTWARE_RTNE).to(tl.float32)
    w = _weight(w_ptr, n_cols, OFFSET_WEIGHT, BLOCK)
    if OFFSET_WEIGHT:  # Gemma: (normed * (1 + w)), as its forward orders the product
        y = normed * w[None, :]
    else:
        y = w[None, :] * normed
    tl.store(y_ptr + offs, round_fp32_to(y, y_ptr.dtype.element_ty, SOFTWARE_RTNE), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, residual_grad_ptr, dx_ptr, narrow_ptr, n_rows,
                              n_cols, HAS_RESIDUAL_GRAD: tl.constexpr, HAS_NARROW: tl.constexpr,
                              OFFSET_WEIGHT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK: tl.constexpr):
    rows, offs, mask = _row_tile(n_rows, n_cols, ROWS, BLOCK)
    w = _weight(w_ptr, n_cols, OFFSET_WEIGHT, BLOCK)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * w[None, :]
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    normed = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
    dx = rstd[:, None] * (g - normed * (tl.sum(g * normed, axis=1) / n_cols)[:, None])
    dx = round_fp32_to(dx, dx_ptr.dtype.element_ty, SOFTWARE_RTNE)
    if HAS_RESIDUAL_GRAD:  # autograd would sum the two rounded gradients: round(dx + residual_grad)
        residual_grad = tl.load(residual_grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = round_fp32_to(dx.to(tl.float32) + residual_grad, dx_ptr.dtype.element_ty, SOFTWARE_RTNE)
    tl.store(dx_ptr + offs, dx, mask=mask)
    if HAS_NARROW:  # dx rounded once more, to a narrower dtype, as autograd's cast of it would round
        tl.store(narrow_ptr + offs, round_fp32_to(dx.to(tl.float32), narrow_ptr.dtype.element_ty, SOFTWARE_RTNE),
                 mask=mask)


@functools.lru_cache(maxsize=256)  # the same few shapes every layer: skip recomputing them per launch
def _launch(n_rows: int, n_cols: int):
    """(grid, meta-parameters) for a (n_rows, n_cols) input: one row per program on the GPU (a 4096-wide
    row already fills a program; measured in bench/RESULTS.md), many in the interpreter."""
    block = next_power_of_2(n_cols)
    rows = max(1, INTERPRETER_TILE // block) if INTERPRETING else 1
    meta = {"BLOCK": block, "ROWS": rows, "num_warps": min(max(block // 256, 1), 16),
            "SOFTWARE_RTNE": INTERPRETING}
    return (cdiv(n_rows, rows),), meta


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset_weight: bool = False):
    """(y, rstd) for a contiguous (rows, cols) x; y in the dtype torch gives weight * x (Llama), or x's
    (`offset_weight`: Gemma's (1 + w))."""
    _, y, rstd = add_rms_norm_forward(x2d, None, weight, eps, offset_weight)
    return y, rstd


def norm_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, offset_weight: bool = False) -> torch.dtype:
    """The dtype of the norm's output as torch computes it: weight * x's promotion (Llama), x's (Gemma)."""
    return x_dtype if offset_weight else torch.promote_types(weight_dtype, x_dtype)


def add_rms_norm_forward(x2d: torch.Tensor, delta2d: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         offset_weight: bool = False, out_dtype: torch.dtype | None = None):
    """(sum, y, rstd) for sum = x + delta (contiguous, of one shape; delta of x's dtype or narrower) and
    y = RMSNorm(sum); without a delta, sum is x itself. y is computed in fp32 and rounded once to `out_dtype`
    (default: `norm_dtype`'s): a narrower one gives the stock output rounded, nothing else."""
    rows, cols = x2d.shape
    has_delta = delta2d is not None
    total = torch.empty_like(x2d) if has_delta else x2d
    y_dtype = out_dtype or norm_dtype(x2d.dtype, weight.dtype, offset_weight)
    y = torch.empty((rows, cols), dtype=y_dtype, device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    grid, meta = _launch(rows, cols)
    _rms_norm_forward_kernel[grid](x2d, delta2d if has_delta else x2d, total, weight, y, rstd, rows, cols, eps,
                                   HAS_DELTA=has_delta, OFFSET_WEIGHT=offset_weight, **meta)
    return total, y, rstd


def rms_norm_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      residual_grad: torch.Tensor | None = None, offset_weight: bool = False,
                      narrow_copy: torch.Tensor | None = None):
    """dX of the norm, plus `residual_grad` (x's gradient from elsewhere, contiguous) when given; with
    `narrow_copy` (contiguous, x's shape, a narrower dtype) dX is also written there, rounded to it (the
    gradient autograd would cast for a narrower addend of x), sparing that cast its read of dX."""
    rows, cols = x2d.shape
    dx = torch.empty_like(x2d)
    grid, meta = _launch(rows, cols)
    has_residual_grad = residual_grad is not None
    _rms_norm_backward_kernel[grid](dy2d, x2d, weight, rstd, residual_grad if has_residual_grad else dy2d, dx,
                                    dx if narrow_copy is None else narrow_copy, rows, cols,
                                    HAS_RESIDUAL_GRAD=has_residual_grad, HAS_NARROW=narrow_copy is not None,
                                    OFFSET_WEIGHT=offset_weight, **meta)
    return dx

"""RMSNorm forward and input-gradient, one row per program, as Llama/Mistral/Qwen2 compute it:
y = w * round(x * rsqrt(mean(x^2) + eps)) with the mean in fp32 and the normalized row rounded to x's dtype
before the weight multiplies it. The weight is frozen (QLoRA trains only adapters), so backward gives dX.
"""

import torch
import triton
import triton.language as tl

from ._utils import interpreting
from .nf4_decode import round_fp32_to


@triton.jit
def _row_offsets(n_cols, BLOCK: tl.constexpr):
    """This program's row start, the column indices and their mask."""
    cols = tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64) * n_cols, cols, cols < n_cols


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                             SOFTWARE_RTNE: tl.constexpr, BLOCK: tl.constexpr):
    start, cols, mask = _row_offsets(n_cols, BLOCK)
    x = tl.load(x_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = round_fp32_to(x * rstd, x_ptr.dtype.element_ty, SOFTWARE_RTNE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + start + cols, round_fp32_to(w * normed, y_ptr.dtype.element_ty, SOFTWARE_RTNE), mask=mask)
    tl.store(rstd_ptr + tl.program_id(0), rstd)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols,
                              SOFTWARE_RTNE: tl.constexpr, BLOCK: tl.constexpr):
    start, cols, mask = _row_offsets(n_cols, BLOCK)
    g = (tl.load(dy_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
         * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32))
    rstd = tl.load(rstd_ptr + tl.program_id(0))
    normed = tl.load(x_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
    dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
    tl.store(dx_ptr + start + cols, round_fp32_to(dx, dx_ptr.dtype.element_ty, SOFTWARE_RTNE), mask=mask)


def _launch_options(n_cols: int) -> dict:
    block = triton.next_power_of_2(n_cols)
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 16), "SOFTWARE_RTNE": interpreting()}


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, rstd) for a contiguous (rows, cols) x; y in the dtype torch gives weight * x."""
    rows, cols = x2d.shape
    y = torch.empty((rows, cols), dtype=torch.promote_types(weight.dtype, x2d.dtype), device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    _rms_norm_forward_kernel[(rows,)](x2d, weight, y, rstd, cols, eps, **_launch_options(cols))
    return y, rstd


def rms_norm_input_grad(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    rows, cols = x2d.shape
    dx = torch.empty_like(x2d)
    _rms_norm_backward_kernel[(rows,)](dy2d, x2d, weight, rstd, dx, cols, **_launch_options(cols))
    return dx

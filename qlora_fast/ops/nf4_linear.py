"""Products with an NF4 weight, choosing per call between in-GEMM dequantization and dequantize + cuBLAS."""

import os

import torch

from ..kernels.nf4_dequantize import nf4_dequantize
from ..kernels.nf4_matmul import nf4_matmul
from ..nf4 import NF4Weight

# Up to this many rows (tokens), take the in-GEMM kernel instead of dequantize + cuBLAS. bench/kernel_timings.py
# measured dequantize + cuBLAS faster at every row count from 1 up (bench/RESULTS.md), so the default
# is 0; QLORA_FAST_FUSED_MAX_ROWS overrides it for experiments. CPU runs always dequantize + matmul.
FUSED_MAX_ROWS = int(os.environ.get("QLORA_FAST_FUSED_MAX_ROWS", "0"))


def uses_in_gemm_dequantize(rows: int, device: torch.device) -> bool:
    """Whether a product of this many rows takes the in-GEMM kernel rather than dequantize + cuBLAS."""
    return device.type == "cuda" and rows <= FUSED_MAX_ROWS


def nf4_linear_forward(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias, added inside the GEMM and rounded once, as bitsandbytes' F.linear does) for a 2-D
    x in the compute dtype."""
    if uses_in_gemm_dequantize(x.shape[0], x.device):
        y = nf4_matmul(x, weight, transpose_weight=True)
        return y if bias is None else y.add_(bias)
    return torch.nn.functional.linear(x, nf4_dequantize(weight, x.dtype), bias)


def nf4_linear_backward(grad_out: torch.Tensor, weight: NF4Weight, accumulate: torch.Tensor | None = None):
    """grad_out @ W, the input gradient of x @ W^T; added in place to `accumulate` when given."""
    if uses_in_gemm_dequantize(grad_out.shape[0], grad_out.device):
        grad = nf4_matmul(grad_out, weight, transpose_weight=False)
        return grad if accumulate is None else accumulate.add_(grad)
    w = nf4_dequantize(weight, grad_out.dtype)
    return grad_out @ w if accumulate is None else accumulate.addmm_(grad_out, w)

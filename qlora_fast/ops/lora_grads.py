"""The adapter gradients of one LoRA projection y = x @ W^T + s * (x @ A^T) @ B^T, shared by the fused
linear and MLP Functions."""

import torch


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None):
    """scale * (a @ b) in one GEMM launch, in `out_dtype` (default a's): the scale rides on alpha, and
    beta=0 makes addmm ignore its (unwritten, broadcast) input instead of a second pass to scale the
    product. On CUDA an fp32 result of fp16/bf16 operands comes straight out of the GEMM's fp32
    accumulator: no 16-bit rounding, and no cast launch."""
    out_dtype = out_dtype or a.dtype
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.addmm(a.new_empty((), dtype=out_dtype), a, b, out_dtype=out_dtype, beta=0, alpha=scale)
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale).to(out_dtype)


def lora_grads(dy, dy_b, x, xa, scaling: float, dtypes) -> tuple:
    """(dA, dB) = (s * (dY @ B)^T @ x, s * dY^T @ (x @ A^T)) in the adapters' dtypes."""
    return scaled_mm(dy_b.t(), x, scaling, dtypes[0]), scaled_mm(dy.t(), xa, scaling, dtypes[1])

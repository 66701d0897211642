"""The adapter gradients of one LoRA projection y = x @ W^T + s * (x @ A^T) @ B^T, shared by the fused
linear and MLP Functions."""

import torch


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b) in one GEMM launch: the scale rides on alpha, and beta=0 makes addmm ignore its
    (unwritten, broadcast) input instead of a second pass to scale the product."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)


def lora_grads(dy, dy_b, x, xa, scaling: float, dtypes) -> tuple:
    """(dA, dB) = (s * (dY @ B)^T @ x, s * dY^T @ (x @ A^T)) in the adapters' dtypes."""
    return scaled_mm(dy_b.t(), x, scaling).to(dtypes[0]), scaled_mm(dy.t(), xa, scaling).to(dtypes[1])

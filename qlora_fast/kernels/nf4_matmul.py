"""C = A @ op(W) with the NF4 weight W (N, K) dequantized tile by tile inside the GEMM's reduction loop.

One kernel serves both directions of a linear layer:
  forward   Y  = X  @ W^T : reduce over K, W read at flat index n*K + k
  backward  dX = dY @ W   : reduce over N, W read at flat index n*K + k with the roles swapped
The weight never exists dequantized in memory, which wins when there are few tokens (the GEMM is
bound by reading W); with many tokens, dequantize + cuBLAS is faster (see ops/nf4_linear.py).
"""

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ._utils import INTERPRETING, cdiv, tuning_configs
from ._utils import round_fp32_to
from .nf4_decode import nf4_decode_elements


def _config(block_m, block_p, block_r, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_R": block_r, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


_CONFIGS = [
    _config(16, 64, 64, 4, 3),
    _config(16, 128, 128, 4, 3),
    _config(64, 128, 64, 4, 3),
    _config(128, 128, 64, 8, 3),
]


@triton.autotune(configs=tuning_configs(_CONFIGS), key=["M", "P", "R", "TRANSPOSE_W"])
@triton.jit
def _nf4_matmul_kernel(a_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, c_ptr,
                       M, P, R, K, stride_am, stride_ar, stride_cm, stride_cp,
                       TRANSPOSE_W: tl.constexpr,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       SOFTWARE_RTNE: tl.constexpr, UPCAST_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # Grouped launch order, so programs that run together share tiles of A in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    group = pid // (GROUP_M * num_pid_p)
    first_m = group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_p)) % group_m
    pid_p = (pid % (GROUP_M * num_pid_p)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    dtype = c_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0)
        w_mask = (offs_r[:, None] < R) & (offs_p[None, :] < P)
        if TRANSPOSE_W:  # reduce over the weight's columns k: element (k=r, n=p)
            flat = offs_p[None, :] * K + offs_r[:, None]
        else:  # reduce over its rows n: element (n=r, k=p)
            flat = offs_r[:, None] * K + offs_p[None, :]
        w = nf4_decode_elements(flat, w_mask, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                offset_ptr, BLOCKSIZE, BLOCKSIZE2, NESTED)
        w = round_fp32_to(w, dtype, SOFTWARE_RTNE)  # the same rounding as the dequantized weight
        if UPCAST_DOT:  # the CPU interpreter's dot is wrong on bf16 operands
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc)
    c_mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp, acc.to(dtype), mask=c_mask)


def nf4_matmul(a: torch.Tensor, weight: NF4Weight, transpose_weight: bool = True) -> torch.Tensor:
    """a @ W^T (transpose_weight, the forward of a linear layer) or a @ W (its input gradient)."""
    n, k = weight.shape
    reduce_dim, out_dim = (k, n) if transpose_weight else (n, k)
    if a.dim() != 2 or a.shape[1] != reduce_dim:
        raise ValueError(f"expected a 2-D input with {reduce_dim} columns, got {tuple(a.shape)}")
    m = a.shape[0]
    out = torch.empty((m, out_dim), dtype=a.dtype, device=a.device)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(out_dim, meta["BLOCK_P"]),)
    _nf4_matmul_kernel[grid](
        a, *weight.kernel_tensors(), out,
        m, out_dim, reduce_dim, k, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        TRANSPOSE_W=transpose_weight,
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, NESTED=weight.nested,
        SOFTWARE_RTNE=INTERPRETING, UPCAST_DOT=INTERPRETING and a.dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )
    return out

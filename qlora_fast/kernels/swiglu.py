"""SwiGLU, h = silu(g) * u, forward and backward, elementwise, with torch's roundings: silu(g) is rounded
to g's dtype before the product (as `act_fn(gate) * up` computes it in two ops). On the GPU this matches
torch bit for bit in bf16; in fp16 a few elements differ by one ulp (Triton's exp vs CUDA's expf).

The backward kernel works in place on the tensors the fused MLP saved: it reads dh, g and u and overwrites
them with h (recomputed for the down projection's LoRA gradient), dg and du, so it needs no extra memory.
"""

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING
from .nf4_decode import round_fp32_to

_BLOCK = INTERPRETER_TILE if INTERPRETING else 1024


@triton.jit
def _offsets(n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n_elements


@triton.jit
def _silu_rounded(g, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr):
    """(sigmoid(g), silu(g) rounded to dtype and back to fp32), g in fp32; silu as torch writes it."""
    denominator = 1.0 + tl.exp(-g)
    return 1.0 / denominator, round_fp32_to(g / denominator, dtype, SOFTWARE_RTNE).to(tl.float32)


@triton.jit
def _load_fp32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_elements,
                           SOFTWARE_RTNE: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n_elements, BLOCK)
    dtype: tl.constexpr = h_ptr.dtype.element_ty
    _, silu = _silu_rounded(_load_fp32(g_ptr, offs, mask), dtype, SOFTWARE_RTNE)
    product = silu * _load_fp32(u_ptr, offs, mask)
    tl.store(h_ptr + offs, round_fp32_to(product, dtype, SOFTWARE_RTNE), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, n_elements,
                            SOFTWARE_RTNE: tl.constexpr, BLOCK: tl.constexpr):
    # In place: dh_ptr <- h, g_ptr <- dg, u_ptr <- du. Each element is read before it is overwritten.
    offs, mask = _offsets(n_elements, BLOCK)
    dtype: tl.constexpr = dh_ptr.dtype.element_ty
    dh, g, u = _load_fp32(dh_ptr, offs, mask), _load_fp32(g_ptr, offs, mask), _load_fp32(u_ptr, offs, mask)
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


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in g's dtype."""
    _check(g, u)
    h = torch.empty_like(g)
    n = g.numel()
    _swiglu_forward_kernel[(triton.cdiv(n, _BLOCK),)](g, u, h, n, SOFTWARE_RTNE=INTERPRETING, BLOCK=_BLOCK)
    return h


def swiglu_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """Overwrites (dh, g, u) with (h, dg, du) and returns them in that order."""
    _check(dh, g, u)
    n = g.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](dh, g, u, n, SOFTWARE_RTNE=INTERPRETING, BLOCK=_BLOCK)
    for t in (dh, g, u):  # Triton wrote them behind autograd's back: a later reader of the old values fails loudly
        torch.autograd.graph.increment_version(t)
    return dh, g, u

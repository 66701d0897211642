"""Causal attention whose output is kept for the checkpoint's recompute instead of computed again.

An offloaded checkpoint's recompute (ops/offloaded_checkpoint.py) runs a decoder layer's forward again only
to rebuild what its backward reads. For attention that is q, k, v, the output and its logsumexp: q, k and v
come cheap from the projections' kept base outputs, but the output costs the attention's forward again.
Kept beside the layer's other kept tensors, output and logsumexp come back instead. Both passes call the
fused kernel torch's scaled_dot_product_attention picks for these inputs (its forward and backward ops,
directly), so outputs and gradients are sdpa's. Causal, no mask, no dropout: anything else takes sdpa.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .offloaded_checkpoint import keeping, kept_items_or_computed, recomputing

aten = torch.ops.aten


@dataclass(frozen=True)
class _FusedKernel:
    # forward(q, k, v, scale) -> (out, logsumexp, *state): state is what the backward op takes besides them
    forward: Callable
    # backward(dout, q, k, v, out, logsumexp, state, scale) -> (dq, dk, dv)
    backward: Callable


def _cudnn_forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    return out, lse, seed, offset, cum_q, cum_k, max_q, max_k


def _cudnn_backward(dout, q, k, v, out, lse, state, scale):
    seed, offset, cum_q, cum_k, max_q, max_k = state
    return aten._scaled_dot_product_cudnn_attention_backward(dout, q, k, v, out, lse, seed, offset, None, cum_q,
                                                             cum_k, max_q, max_k, 0.0, True, scale=scale)


def _flash_forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale)
    return out, lse, cum_q, cum_k, max_q, max_k, seed, offset


def _flash_backward(dout, q, k, v, out, lse, state, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k,
                                                             0.0, True, seed, offset, scale=scale)


def _efficient_forward(q, k, v, scale):
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True,
                                                                           scale=scale)
    return out, lse, seed, offset


def _efficient_backward(dout, q, k, v, out, lse, state, scale):
    seed, offset = state
    return aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], True, scale=scale)[:3]


def _cpu_flash_forward(q, k, v, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, state, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, True,
                                                                     scale=scale)


_KERNELS = {  # (device type, the backend sdpa picks) -> its ops
    ("cuda", int(SDPBackend.CUDNN_ATTENTION)): _FusedKernel(_cudnn_forward, _cudnn_backward),
    ("cuda", int(SDPBackend.FLASH_ATTENTION)): _FusedKernel(_flash_forward, _flash_backward),
    ("cuda", int(SDPBackend.EFFICIENT_ATTENTION)): _FusedKernel(_efficient_forward, _efficient_backward),
    ("cpu", int(SDPBackend.FLASH_ATTENTION)): _FusedKernel(_cpu_flash_forward, _cpu_flash_backward),
}


def _fused_kernel(q, k, v, scale) -> _FusedKernel | None:
    """The ops of the kernel sdpa would run on these inputs (causal, no mask), None for its math path and
    for head dims sdpa pads to a multiple of 8 before its CUDA flash kernel."""
    if q.is_cuda and q.shape[-1] % 8:
        return None
    gqa = k.shape[1] != q.shape[1]
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=gqa)
    return _KERNELS.get((q.device.type, int(choice)))


class _KeptAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, key, kernel):
        out, lse, *state = kept_items_or_computed(key, lambda: kernel.forward(q, k, v, scale))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.state, ctx.scale, ctx.kernel = state, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        # dout as sdpa's own backward passes it: in the layout it arrives in, unless its innermost stride is
        # not 1. torch's cuDNN backward caches its graphs by q, k and v's layout but not dout's, so a dout
        # laid out otherwise than the model's sdpa calls lay theirs out replays their graph on the wrong
        # strides: silently wrong gradients (bench/NOTES.md, session 21)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.state, ctx.scale)
        return dq, dk, dv, None, None, None


def kept_attention(key, q, k, v, scale: float | None):
    """Causal attention of (batch, heads, length, head_dim) q, k, v (k and v may have fewer heads: grouped
    query attention), as F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=...) computes it; inside an offloaded checkpoint its output is kept for the recompute under
    `key` (one attention module's call). Elsewhere, or where sdpa takes its math path, it is sdpa."""
    if torch.is_autocast_enabled(q.device.type):  # sdpa computes in autocast's dtype there, and so do its ops
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    kernel = _fused_kernel(q, k, v, scale) if keeping() or recomputing() else None
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return _KeptAttention.apply(q, k, v, scale, key, kernel)

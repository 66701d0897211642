"""Causal attention within each sequence of a packed (padding-free) batch, nothing across sequences.

A packed row holds several sequences back to back. The dense block-causal mask transformers builds for it
makes attention compute the whole row's causal triangle, sum(len)^2 / 2 scores; attending within each
sequence computes sum(len^2) / 2 of them (about 1/8 for ~1,000-token sequences in an 8k row) and gives the
same outputs: a masked score contributes exp(-inf) = 0 in either case.

Backends, best first: flash-attn's varlen kernel when installed; torch's varlen_attn (its flash kernel)
where this torch has it; else each sequence through scaled_dot_product_attention in turn (the CPU path,
and the reference the others are tested against).
"""

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PackedSequences:
    """Where each sequence of a packed batch starts in the flattened (batch * length) token axis."""
    cu_seqlens: torch.Tensor  # int32 (n + 1,): 0, end of sequence 0, ..., batch * length; on the device
    max_length: int


def find_packed_sequences(position_ids: torch.Tensor, batch_size: int) -> PackedSequences | None:
    """The sequences of a batch whose position_ids restart, by transformers' rule (a new sequence wherever a
    position is not its predecessor's + 1; rows never share a sequence); None when every row is one
    sequence. One host sync: the boundaries' count and the longest sequence."""
    if position_ids.dim() != 2:
        return None
    position_ids = position_ids.expand(batch_size, -1)
    rows, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    begins = starts.reshape(-1).nonzero().squeeze(1)
    if begins.numel() == rows:
        return None
    cu_seqlens = torch.cat([begins, begins.new_tensor([rows * length])]).to(torch.int32)
    return PackedSequences(cu_seqlens, int(cu_seqlens.diff().max()))


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_FLASH_ATTN_VARLEN = _flash_attn_varlen()
_TORCH_VARLEN = _torch_varlen()
_TORCH_VARLEN_ARGS = set(inspect.signature(_TORCH_VARLEN).parameters) if _TORCH_VARLEN is not None else set()


def _has_causal_torch_varlen() -> bool:
    return bool(_TORCH_VARLEN_ARGS & {"window_size", "is_causal"})  # versions say causal one way or the other


def worth_it_on(device: torch.device) -> bool:
    """Whether packed attention beats the dense mask on `device`: on a GPU only through a varlen kernel (a
    loop over sequences there costs launches per sequence and layer), on the CPU always."""
    return device.type != "cuda" or _FLASH_ATTN_VARLEN is not None or _has_causal_torch_varlen()


def _flash_kernel_applies(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def backend(q: torch.Tensor) -> str:
    """Which path packed_attention takes for these queries."""
    if _flash_kernel_applies(q):
        if _FLASH_ATTN_VARLEN is not None:
            return "flash_attn"
        if _has_causal_torch_varlen():
            return "torch_varlen"
    return "per_sequence"


def _torch_varlen_attention(q, k, v, cu, max_length, scale):
    kwargs = {"scale": scale} if "scale" in _TORCH_VARLEN_ARGS else {}
    if "window_size" in _TORCH_VARLEN_ARGS:
        kwargs["window_size"] = (-1, 0)  # causal: no key after the query, any before
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _TORCH_VARLEN_ARGS:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    if "scale" not in _TORCH_VARLEN_ARGS and scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel scales by head_dim^-0.5
    return _TORCH_VARLEN(q, k, v, cu, cu, max_length, max_length, **kwargs)


def _per_sequence_attention(q, k, v, cu, scale):
    bounds = cu.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # (len, heads, dim) -> (1, heads, len, dim): each sequence alone, as if it were the whole batch
        one = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*one, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sequences: PackedSequences,
                     scale: float | None = None) -> torch.Tensor:
    """query (batch, heads, length, dim), key/value (batch, kv_heads, length, dim) -> the attention output
    (batch, length, heads, dim), as transformers' attention functions return it."""
    batch, heads, length, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    if torch.is_autocast_enabled(query.device.type):  # SDPA computes in autocast's dtype there: so do these
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    # (batch, heads, length, dim) -> (batch * length, heads, dim); free when the projections wrote (b, l, h, d)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    cu = sequences.cu_seqlens
    path = backend(q)
    if path == "flash_attn":
        out = _FLASH_ATTN_VARLEN(q, k, v, cu, cu, sequences.max_length, sequences.max_length, dropout_p=0.0,
                                 softmax_scale=scale, causal=True)
    elif path == "torch_varlen":
        out = _torch_varlen_attention(q, k, v, cu, sequences.max_length, scale)
    else:
        out = _per_sequence_attention(q, k, v, cu, scale)
    return out.reshape(batch, length, heads, dim)

"""NF4 -> fp16/bf16/fp32 dequantization in one pass, double-quantized absmax decoded on the fly.

Each program reads a run of packed bytes with wide loads, decodes both nibbles, and writes the two
values interleaved, so reads and writes stay contiguous. Bit-exact with bitsandbytes: the same fp32
products, rounded once to the output dtype.
"""

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ._utils import interpreting, tuning_configs
from .nf4_decode import nf4_block_scale, round_fp32_to

_CONFIGS = [
    triton.Config({"BYTES_PER_PROGRAM": 2048}, num_warps=4),
    triton.Config({"BYTES_PER_PROGRAM": 1024}, num_warps=4),
    triton.Config({"BYTES_PER_PROGRAM": 4096}, num_warps=8),
    triton.Config({"BYTES_PER_PROGRAM": 8192}, num_warps=8),
    triton.Config({"BYTES_PER_PROGRAM": 4096}, num_warps=4),
]


@triton.autotune(configs=tuning_configs(_CONFIGS), key=["n_elements", "NESTED"])
@triton.jit
def _nf4_dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                           n_elements,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                           SOFTWARE_RTNE: tl.constexpr, BYTES_PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    byte_idx = pid * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)
    byte_mask = byte_idx < (n_elements + 1) // 2
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    # Blocks hold an even number of elements, so both nibbles of a byte share one scale.
    scale = nf4_block_scale(byte_idx // (BLOCKSIZE // 2), byte_mask, absmax_ptr, absmax2_ptr, code2_ptr,
                            offset_ptr, BLOCKSIZE2, NESTED)
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 15)) * scale
    values = round_fp32_to(tl.interleave(high, low), out_ptr.dtype.element_ty, SOFTWARE_RTNE)
    out_idx = pid * (2 * BYTES_PER_PROGRAM) + tl.arange(0, 2 * BYTES_PER_PROGRAM)
    tl.store(out_ptr + out_idx, values, mask=out_idx < n_elements)


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """The (out_features, in_features) weight in `dtype` (default: the dtype bitsandbytes would give)."""
    dtype = dtype or weight.dtype
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif out.shape != weight.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(weight.shape)} {dtype} tensor")
    if weight.numel >= 2**31:
        raise ValueError(f"NF4 weight of {weight.numel} elements exceeds 32-bit indexing")
    nested = weight.nested
    absmax2, code2, offset = (weight.absmax2, weight.code2, weight.offset) if nested else (weight.absmax,) * 3
    grid = lambda meta: (triton.cdiv((weight.numel + 1) // 2, meta["BYTES_PER_PROGRAM"]),)
    _nf4_dequantize_kernel[grid](
        weight.packed, weight.code, weight.absmax, absmax2, code2, offset, out, weight.numel,
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, NESTED=nested, SOFTWARE_RTNE=interpreting(),
        enable_fp_fusion=False,
    )
    return out

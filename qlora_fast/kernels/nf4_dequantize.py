"""NF4 -> fp16/bf16/fp32 dequantization in one pass, double-quantized absmax decoded on the fly.

Each program takes a tile of whole quantization blocks: it decodes each block's scale once, reads the
packed bytes with wide loads, decodes both nibbles and writes the two values interleaved, so reads
and writes stay contiguous. Bit-exact with bitsandbytes: the same fp32
products, rounded once to the output dtype.
"""

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ._utils import INTERPRETING, cdiv
from .nf4_decode import nf4_block_scale, round_fp32_to

# Launch parameters, fixed rather than autotuned: tuning at the first call of each weight shape costs a
# 256 MB cache-flush buffer while the model's memory is in use (it set the peak of a whole training run)
# and ~10 us of host time per launch. bench/kernels.py times the candidates; the first is the default.
CANDIDATE_META = [
    {"BLOCKS_PER_PROGRAM": 64, "num_warps": 4},
    {"BLOCKS_PER_PROGRAM": 32, "num_warps": 4},
    {"BLOCKS_PER_PROGRAM": 128, "num_warps": 8},
    {"BLOCKS_PER_PROGRAM": 256, "num_warps": 8},
    {"BLOCKS_PER_PROGRAM": 128, "num_warps": 4},
]


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                           n_elements,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                           SOFTWARE_RTNE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    # A tile of whole quantization blocks: one scale per row, decoded once and broadcast.
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per block
    block = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block_mask = block * BLOCKSIZE < n_elements
    scale = nf4_block_scale(block, block_mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            BLOCKSIZE2, NESTED)
    byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < (n_elements + 1) // 2, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    values = round_fp32_to(tl.interleave(high, low), out_ptr.dtype.element_ty, SOFTWARE_RTNE)
    out_idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_idx, values, mask=out_idx < n_elements)


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   meta: dict = CANDIDATE_META[0]):
    """The (out_features, in_features) weight in `dtype` (default: the dtype bitsandbytes would give);
    `meta`: launch parameters, one of CANDIDATE_META."""
    dtype = dtype or weight.dtype
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif out.shape != weight.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(weight.shape)} {dtype} tensor")
    n_blocks = cdiv(weight.numel, weight.blocksize)
    _nf4_dequantize_kernel[(cdiv(n_blocks, meta["BLOCKS_PER_PROGRAM"]),)](
        *weight.kernel_tensors(), out, weight.numel,
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, NESTED=weight.nested,
        SOFTWARE_RTNE=INTERPRETING,
        enable_fp_fusion=False,
        **meta,
    )
    return out

"""Device helpers shared by the NF4 kernels: decode nibbles and block scales exactly as bitsandbytes does."""

import triton
import triton.language as tl


@triton.jit
def nf4_block_scale(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                    BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """The fp32 absmax of NF4 block `block`; with double quantization, code2[q] * absmax2 + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        # bitsandbytes adds the offset in a separate pass: the caller disables FMA fusion to round alike.
        return scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nf4_decode_elements(flat, mask, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """fp32 values of the weight elements at flat (row-major) indices `flat`; 0 where masked."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (flat & 1)) * 4)) & 15  # even elements sit in the high nibble
    scale = nf4_block_scale(flat // BLOCKSIZE, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            BLOCKSIZE2, NESTED)
    return tl.where(mask, tl.load(code_ptr + nibble) * scale, 0.0)


@triton.jit
def round_fp32_to(x, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr):
    """fp32 -> `dtype`, round to nearest even. SOFTWARE_RTNE spells the bf16 rounding out, because
    Triton's CPU interpreter truncates fp32 -> bf16 where the GPU (and bitsandbytes) round."""
    if SOFTWARE_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)

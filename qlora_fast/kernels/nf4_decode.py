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

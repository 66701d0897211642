"""References written from bitsandbytes' storage format, independent of the kernels under test."""

import bitsandbytes.functional as F
import torch


def reference_dequantize(params4bit, dtype=None) -> torch.Tensor:
    """Plain-torch NF4 decode: flat row-major blocks, high nibble first, fp32 products rounded once."""
    state = params4bit.quant_state
    packed = params4bit.data.view(torch.uint8).reshape(-1).long()
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    numel = state.shape[0] * state.shape[1]
    values = state.code[nibbles[:numel]] * absmax.float().repeat_interleave(state.blocksize)[:numel]
    return values.view(state.shape).to(dtype or state.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

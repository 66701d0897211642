"""References written from bitsandbytes' storage format, independent of the kernels under test."""

import os

import bitsandbytes.functional as F
import torch

# Set by tests/conftest.py for the test process; a user's shell has neither.
TEST_ONLY_VARIABLES = ("TRITON_INTERPRET", "HF_HUB_OFFLINE")


def user_environment() -> dict:
    """The environment a user's shell gives a script: this one without the test runner's variables."""
    return {k: v for k, v in os.environ.items() if k not in TEST_ONLY_VARIABLES}


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

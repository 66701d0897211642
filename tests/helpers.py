"""References written from bitsandbytes' storage format, independent of the kernels under test."""

import os

import bitsandbytes.functional as F
import pytest
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


def same_up_to_fp32_sum_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit in 16-bit dtypes, where a rounding in the wrong place shows; in fp32, within the spread
    of summation order: under TRITON_INTERPRET=1, tl.dot is numpy's matmul, whose fp32 sums on some CPUs
    (OpenBLAS's Zen kernels) depend on the tile's shape."""
    if a.dtype != b.dtype:
        return False
    if a.dtype == torch.float32:
        return rel_err(a, b) < 1e-6
    return torch.equal(a, b)


# A tiny fp32 QLoRA model and the stock-vs-patched check every patching test builds on.
def tiny_qlora(shape="tiny-llama", dtype=torch.float32, **lora):
    from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm

    model = quantize_to_nf4_(random_causal_lm(shape, dtype), compute_dtype=dtype)
    return add_lora(model, init_b_std=0.02, **lora)


def loss_and_grads(model, ids, **inputs):
    """One seeded forward + backward on `ids` (as labels too) and any further model `inputs`: the loss and
    every gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(input_ids=ids, labels=ids, **inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(stock, patched):
    """Two (loss, grads) of an fp32 model agree: 1e-5 on the loss, 1e-4 on every LoRA gradient."""
    assert patched[0] == pytest.approx(stock[0], rel=1e-5)
    assert patched[1].keys() == stock[1].keys()
    assert all(rel_err(patched[1][n], stock[1][n]) < 1e-4 for n in stock[1])


def patched_keeps_loss_and_grads(model, ids, **options):
    """Patches `model` with `options` between a stock and a patched fwd+bwd that must agree (fp32
    model: 1e-5 on the loss, 1e-4 on every LoRA gradient); returns the PatchReport."""
    stock = loss_and_grads(model, ids)
    from qlora_fast import patch_model

    report = patch_model(model, **options)
    assert_same_loss_and_grads(stock, loss_and_grads(model, ids))
    return report


def doubled_gate_term(swiglu_forward):
    """A mutant of a SwiGLU forward launcher: the gate projection's LoRA term at twice its scaling."""
    return lambda g, u, gate_term=None, up_term=None, **kw: swiglu_forward(
        g, u, gate_term._replace(scale=2 * gate_term.scale), up_term, **kw)

"""Kept attention gives sdpa's outputs and gradients through an offloaded checkpoint, with the attention's
forward run once (the first pass) and its output kept for the recompute. On the CPU the fused kernel is
torch's CPU flash attention; bench/gpu_checks.py checks cuDNN's and flash's on the GPU."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_fast.ops import kept_attention as kept
from qlora_fast.ops import offloaded_checkpoint as offloaded
from qlora_fast.ops.offloaded_checkpoint import keep_outcomes, offloaded_checkpoint

HEADS, HEAD_DIM = 4, 8


class Attention(torch.nn.Module):
    """q, k, v projections, causal attention of `heads` query heads over `kv_heads`, an output projection."""

    def __init__(self, kv_heads: int, dtype=torch.float32):
        super().__init__()
        hidden = HEADS * HEAD_DIM
        self.q = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.kv = torch.nn.Linear(hidden, 2 * kv_heads * HEAD_DIM, dtype=dtype)
        self.o = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.kv_heads = kv_heads

    def forward(self, x, attend):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2, self.kv_heads, HEAD_DIM).unbind(2)
        out = attend(self, q, k.transpose(1, 2), v.transpose(1, 2), HEAD_DIM ** -0.5)
        return x + self.o(out.transpose(1, 2).reshape(batch, length, -1))


def sdpa(module, q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def step(model, x, attend, checkpoint_fn):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    h = x
    for _ in range(2):  # a chain, as decoder layers are
        h = checkpoint_fn(functools.partial(model, attend=attend), h)
    h.float().pow(2).sum().backward()
    return [h.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.fixture
def forward_calls(monkeypatch):
    """How many times the fused kernel's forward runs."""
    calls = []
    key = ("cpu", int(torch.nn.attention.SDPBackend.FLASH_ATTENTION))
    kernel = kept._KERNELS[key]

    def counted(*args):
        calls.append(1)
        return kernel.forward(*args)

    monkeypatch.setitem(kept._KERNELS, key, kept._FusedKernel(counted, kernel.backward))
    return calls


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_sdpa_under_torch_checkpoint_with_one_forward(kv_heads, dtype, forward_calls):
    torch.manual_seed(0)
    model = Attention(kv_heads, dtype)
    x = torch.randn(2, 24, HEADS * HEAD_DIM, dtype=dtype)
    reference = step(model, x, sdpa, functools.partial(checkpoint, use_reentrant=False))
    keep_outcomes(reset=True)
    ours = step(model, x, lambda m, *a: kept.kept_attention(m, *a), offloaded_checkpoint)
    assert len(forward_calls) == 2  # one a layer: the recompute took the kept output
    assert keep_outcomes(reset=True)["kept"] == 2
    for r, o in zip(reference, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_fp32_inputs_under_autocast_attend_in_its_dtype(forward_calls):
    """A prepared model (fp32 norms) under autocast can hand attention fp32 q/k/v: sdpa computes them in
    bf16 there, and so must the fused ops called directly (on the GPU they take only 16-bit inputs)."""
    torch.manual_seed(0)
    x = torch.randn(2, HEADS, 24, 3 * HEAD_DIM)

    def layer(h, attend):  # fp32 q, k, v: elementwise ops keep autocast's hands off them
        q, k, v = (h * 1.5).split(HEAD_DIM, dim=-1)
        return attend(layer, q, k, v, None)

    def run(attend):
        h = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = offloaded_checkpoint(functools.partial(layer, attend=attend), h)
        out.float().square().sum().backward()
        return out.detach(), h.grad

    reference, ours = run(sdpa), run(kept.kept_attention)
    assert ours[0].dtype == torch.bfloat16 and len(forward_calls) == 1
    for r, o in zip(reference, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_a_wrong_kept_output_changes_the_gradients(monkeypatch):
    """The mutant: the recompute hands back twice the kept output. The input's gradient must move
    (the output projection's weight gradient reads the kept output), so the parity test can fail."""
    torch.manual_seed(0)
    model = Attention(HEADS)
    x = torch.randn(2, 24, HEADS * HEAD_DIM)
    reference = step(model, x, sdpa, functools.partial(checkpoint, use_reentrant=False))
    fetched = offloaded.kept_for_recompute
    monkeypatch.setattr(offloaded, "kept_for_recompute",
                        lambda key: None if (v := fetched(key)) is None else (2 * v[0], *v[1:]))
    ours = step(model, x, lambda m, *a: kept.kept_attention(m, *a), offloaded_checkpoint)
    assert not torch.allclose(ours[-2], reference[-2])  # o's weight gradient


def test_outside_a_checkpoint_it_is_sdpa(forward_calls):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, 8, HEAD_DIM) for _ in range(3))
    torch.testing.assert_close(kept.kept_attention(object(), q, k, v, None),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    assert not forward_calls


@pytest.mark.parametrize("grad_layout", ["transposed", "expanded"])
def test_backward_hands_dout_on_as_sdpa_does(grad_layout):
    """torch's cuDNN backward caches its graphs without dout's layout: a dout laid out otherwise than the
    model's sdpa calls hand theirs gave wrong gradients on the H100 (bench/NOTES.md, session 21). So dout
    goes to the fused backward as it arrives, made contiguous only where its innermost stride is not 1."""
    seen = []

    def backward(dout, q, k, v, out, lse, state, scale):
        seen.append(dout.stride())
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    q, k, v = (torch.randn(2, HEADS, 6, HEAD_DIM, requires_grad=True) for _ in range(3))
    kernel = kept._FusedKernel(lambda q, k, v, scale: (q * 1.0, torch.zeros(2, HEADS, 6)), backward)
    out = kept._KeptAttention.apply(q, k, v, None, object(), kernel)
    if grad_layout == "transposed":  # as a model's transpose(1, 2) of the output hands it back
        grad = torch.randn(2, 6, HEADS, HEAD_DIM).transpose(1, 2)
        out.backward(grad)
        assert seen == [grad.stride()] and grad.stride() != out.stride()
    else:  # out.sum().backward()
        out.sum().backward()
        assert seen == [out.stride()]

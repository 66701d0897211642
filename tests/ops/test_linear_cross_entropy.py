import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from qlora_fast.ops.linear_cross_entropy import causal_lm_loss, default_chunk_tokens, linear_log_probs
from tests.helpers import rel_err


def reference(hidden, weight, labels, num_items_in_batch=None):
    logits = hidden @ weight.t()
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items_in_batch)


def grads(fn, hidden, weight, *args):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fn(h, w, *args)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("num_items", [None, 37])
def test_matches_transformers_loss(dtype, tol, chunk, num_items):
    hidden = torch.randn(3, 11, 32, dtype=dtype)
    weight = torch.randn(101, 32, dtype=dtype) * 0.3
    labels = torch.randint(0, 101, (3, 11))
    labels[0, :4] = -100  # a prompt
    labels[2, -3:] = -100  # padding
    ours = grads(lambda h, w, lab: causal_lm_loss(h, w, lab, num_items, chunk), hidden, weight, labels)
    ref = grads(lambda h, w, lab: reference(h, w, lab, num_items), hidden, weight, labels)
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype and rel_err(o, r) < tol


def test_all_ignored_gives_zero_loss_and_grad():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss = causal_lm_loss(hidden, torch.randn(13, 8), torch.full((1, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def log_prob_reference(hidden, weight, targets, softcap=None):
    """float64 log p[target], entropy and top-1 per row (0, 0, False where the target is -100)."""
    z = hidden.double() @ weight.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z, dim=-1)
    counted = targets != -100
    safe = targets.masked_fill(~counted, 0)
    log_probs = log_p.gather(1, safe[:, None]).squeeze(1) * counted
    entropy = -(log_p.exp() * log_p).sum(1) * counted
    return log_probs, entropy, (z.argmax(1) == targets) & counted


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [None, 7])
def test_log_probs_entropy_and_their_gradients_match_float64(dtype, tol, softcap, chunk):
    """Non-uniform per-token gradients on both outputs (TRL's DFT loss weighs tokens; an entropy bonus
    differentiates the entropy): the gradient scaled in backward, and the entropy's recomputed."""
    hidden = torch.randn(23, 32, dtype=dtype)
    weight = (torch.randn(101, 32) * 0.3).to(dtype)
    targets = torch.randint(0, 101, (23,))
    targets[:4] = -100
    g_log_p, g_entropy = torch.randn(23), torch.randn(23)

    def run(fn, h):
        h = h.detach().requires_grad_(True)
        log_probs, entropy, top1 = fn(h)
        ((log_probs * g_log_p.to(log_probs.dtype)).sum() + (entropy * g_entropy.to(entropy.dtype)).sum()).backward()
        return log_probs.detach(), entropy.detach(), top1, h.grad

    log_probs, entropy, top1, grad = run(lambda h: linear_log_probs(h, weight, targets, softcap, chunk), hidden)
    ref_log_probs, ref_entropy, ref_top1, ref_grad = run(lambda h: log_prob_reference(h, weight, targets, softcap),
                                                         hidden.double())
    assert log_probs.dtype == entropy.dtype == torch.float32 and top1.dtype == torch.bool
    assert grad.dtype == dtype and rel_err(grad, ref_grad) < tol
    assert rel_err(log_probs, ref_log_probs) < tol and rel_err(entropy, ref_entropy) < tol
    if dtype == torch.float32:
        assert torch.equal(top1, ref_top1)
    assert log_probs[:4].eq(0).all() and entropy[:4].eq(0).all() and not top1[:4].any()


def test_log_probs_gradient_alone_skips_the_entropy_recompute(monkeypatch):
    import qlora_fast.ops.linear_cross_entropy as module

    monkeypatch.setattr(module, "_entropy_backward", lambda *args: pytest.fail("entropy recomputed"))
    hidden = torch.randn(9, 16, requires_grad=True)
    log_probs, entropy, _ = linear_log_probs(hidden, torch.randn(50, 16), torch.randint(0, 50, (9,)))
    (log_probs.sum() + entropy.detach().sum()).backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_no_gradient_asked_no_gradient_product(monkeypatch):
    """Under no_grad (TRL reads the fused head's outputs for metrics so) only the logits' GEMM runs."""
    hidden, weight, targets = torch.randn(9, 16), torch.randn(50, 16), torch.randint(0, 50, (9,))
    with_grad = linear_log_probs(hidden.requires_grad_(True), weight, targets)
    products = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: products.append(1) or real_mm(*args, **kwargs))
    with torch.no_grad():
        without = linear_log_probs(hidden, weight, targets)
    assert len(products) == 1
    for a, b in zip(with_grad, without):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("vocab,tokens", [(128256, 512), (152064, 512), (256000, 256), (32000, 2048), (2**27, 1)])
def test_default_chunks_are_powers_of_two_near_the_logit_budget(vocab, tokens):
    """Llama-3's, Qwen2.5's and Gemma-2's vocabularies: whole GEMM tiles; never below one token."""
    assert default_chunk_tokens(vocab) == tokens

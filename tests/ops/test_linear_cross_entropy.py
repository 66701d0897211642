import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from qlora_fast.ops.linear_cross_entropy import causal_lm_loss
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

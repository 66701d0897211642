import pytest
import torch

from qlora_fast.kernels.cross_entropy import IGNORE_INDEX, cross_entropy_forward_backward_
from tests.helpers import rel_err

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def reference(logits, targets, divisor):
    """float64 per-row losses and d(sum(losses) / divisor)/d logits."""
    x = logits.double()
    counted = targets != IGNORE_INDEX
    safe = targets.masked_fill(~counted, 0)
    lse = torch.logsumexp(x, dim=1)
    losses = (lse - x.gather(1, safe[:, None]).squeeze(1)) * counted
    grad = torch.softmax(x, dim=1) - torch.nn.functional.one_hot(safe, x.shape[1])
    return losses, grad * (counted / divisor)[:, None]


# 70001 columns: more than one tile per row in the interpreter's 2^16 tiles too, and not a multiple of it.
@pytest.mark.parametrize("rows,vocab", [(5, 1000), (3, 70001), (130, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_losses_and_in_place_gradient_match_float64(rows, vocab, dtype):
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    targets[1] = IGNORE_INDEX
    divisor = torch.tensor(rows + 3.0)
    ref_losses, ref_grad = reference(logits, targets, divisor)
    losses = torch.full((rows,), float("nan"))
    cross_entropy_forward_backward_(logits, targets, divisor, losses)
    assert rel_err(losses, ref_losses) < 1e-6
    assert losses[1] == 0 and torch.all(logits[1] == 0)  # an ignored row: no loss, no gradient
    assert rel_err(logits, ref_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows,vocab", [(5, 1000), (3, 70001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_top1_and_log_prob_gradient_match_float64(rows, vocab, dtype):
    """Divisor -1: the gradient written is d log p[target] / dz; entropy and top-1 (first maximum) per row."""
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    targets = logits.float().argmax(1)
    targets[1] = IGNORE_INDEX
    targets[2] = (targets[2] + 1) % vocab  # not the row's maximum
    logits[0, vocab - 1] = logits[0].max()  # a tie after the target's first maximum still counts
    p = torch.softmax(logits.double(), dim=1)
    ref_entropy = -(p * torch.log_softmax(logits.double(), dim=1)).sum(1) * (targets != IGNORE_INDEX)
    ref_losses, ref_grad = reference(logits, targets, torch.tensor(-1.0))
    losses, entropy, top1 = torch.empty(rows), torch.empty(rows), torch.empty(rows, dtype=torch.int8)
    cross_entropy_forward_backward_(logits, targets, torch.tensor(-1.0), losses, None, entropy, top1)
    assert rel_err(losses, ref_losses) < 1e-6 and rel_err(logits, ref_grad) < TOLERANCE[dtype]
    assert rel_err(entropy, ref_entropy) < 1e-5 and entropy[1] == 0
    assert top1.tolist() == [1, 0, 0] + [1] * (rows - 3)


def test_a_tie_before_the_target_is_not_top1():
    logits = torch.zeros(1, 8)
    logits[0, 2] = logits[0, 5] = 3.0
    for target, expected in ((2, 1), (5, 0)):
        top1 = torch.empty(1, dtype=torch.int8)
        cross_entropy_forward_backward_(logits.clone(), torch.tensor([target]), torch.tensor(1.0), torch.empty(1),
                                        None, torch.empty(1), top1)
        assert top1.item() == expected


def test_rows_of_a_wider_buffer():
    """A chunk of a (rows, vocab) buffer whose row stride is not the vocabulary size."""
    wide = torch.randn(4, 96)
    logits = wide[:, :90]
    targets = torch.tensor([0, 89, 45, 3])
    untouched = wide[:, 90:].clone()
    ref_losses, ref_grad = reference(logits, targets, torch.tensor(4.0))
    losses = torch.empty(4)
    cross_entropy_forward_backward_(logits, targets, torch.tensor(4.0), losses)
    assert rel_err(losses, ref_losses) < 1e-6 and rel_err(logits, ref_grad) < 1e-5
    assert torch.equal(wide[:, 90:], untouched)


def test_a_label_outside_the_vocabulary_gives_nan_not_a_number_read_elsewhere():
    logits = torch.randn(3, 50)
    losses = torch.empty(3)
    cross_entropy_forward_backward_(logits, torch.tensor([4, 50, -100]), torch.tensor(2.0), losses)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1]) and losses[2] == 0
    assert torch.isnan(logits[1]).all() and torch.isfinite(logits[0]).all() and torch.all(logits[2] == 0)


def softcapped_reference(logits, targets, divisor, softcap):
    """Stock's softcapped loss (logits / c, tanh, * c, each in the logits' dtype) and its autograd
    gradient, through float64 cross-entropy."""
    x = logits.clone().requires_grad_(True)
    z = torch.tanh(x / softcap) * softcap
    losses = torch.nn.functional.cross_entropy(z.double(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    (losses.sum() / divisor).backward()
    return losses.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_logits_match_stock(dtype):
    """Gemma-2's final_logit_softcapping inside the kernel: stock's loss and gradient, on logits beyond the
    cap (tanh saturates) and within it; the same kernel without the cap fails the comparison."""
    logits = (torch.randn(6, 3000) * 40).to(dtype)
    targets = torch.randint(0, 3000, (6,))
    targets[2] = IGNORE_INDEX
    ref_losses, ref_grad = softcapped_reference(logits, targets, torch.tensor(5.0), 30.0)
    losses, grad = torch.empty(6), logits.clone()
    cross_entropy_forward_backward_(grad, targets, torch.tensor(5.0), losses, softcap=30.0)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(losses, ref_losses) < tolerance and rel_err(grad, ref_grad) < tolerance
    uncapped, grad = torch.empty(6), logits.clone()
    cross_entropy_forward_backward_(grad, targets, torch.tensor(5.0), uncapped)
    assert rel_err(uncapped, ref_losses) > 0.1 and rel_err(grad, ref_grad) > 0.1

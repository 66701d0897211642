import torch

from qlora_fast.ops.unread_sum import unread_sum


def test_unread_sum_hands_its_gradient_to_both_terms():
    a = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    total = unread_sum(a, b)
    assert total.shape == a.shape and total.dtype == torch.bfloat16
    assert total.untyped_storage().nbytes() == 2  # one element, broadcast: no (3 x 8) allocation
    grad = torch.randn(3, 8, dtype=torch.bfloat16)
    total.backward(grad)
    assert torch.equal(a.grad, grad) and torch.equal(b.grad, grad)

import pytest
import torch

from qlora_fast.ops.lora_grads import scaled_mm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_is_the_scaled_product_whatever_its_scratch_input_holds(dtype, monkeypatch):
    a, b = torch.randn(7, 5, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    # addmm with beta=0 must not read its input: make the scratch a NaN
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, size: torch.full(size, float("nan"), dtype=self.dtype))
    out = scaled_mm(a, b, 0.25)
    torch.testing.assert_close(out.float(), (a.double() @ b.double() * 0.25).float(), rtol=1e-2, atol=1e-2)

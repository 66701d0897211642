import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_fast.ops.rms_norm import rms_norm
from tests.helpers import rel_err


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows,cols", [(21, 64), (21, 100), (1100, 64)])  # 1100 rows span two programs
def test_matches_transformers_llama_rms_norm(x_dtype, w_dtype, rows, cols):
    norm = LlamaRMSNorm(cols, eps=1e-5).to(w_dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (torch.randn(rows, cols) * 3).to(x_dtype)
    grad_out = torch.randn(rows, cols).to(torch.promote_types(x_dtype, w_dtype))

    x_ref = x.clone().requires_grad_(True)
    y_ref = norm(x_ref)
    y_ref.backward(grad_out)
    x_ours = x.clone().requires_grad_(True)
    y_ours = rms_norm(x_ours, norm.weight, norm.variance_epsilon)
    y_ours.backward(grad_out)

    assert y_ours.dtype == y_ref.dtype and x_ours.grad.dtype == x_ref.grad.dtype
    # the same fp32 math rounded at the same points; the row sum's order differs from torch's
    torch.testing.assert_close(y_ours, y_ref)
    tolerance = 1e-5 if x_dtype == torch.float32 else 1e-2
    assert rel_err(x_ours.grad, x_ref.grad) < tolerance

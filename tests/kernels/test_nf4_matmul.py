import pytest
import torch

from qlora_fast.kernels.nf4_matmul import nf4_matmul
from qlora_fast.nf4 import nf4_weight_from_bnb
from tests.helpers import reference_dequantize, rel_err
from tests.kernels.test_nf4_dequantize import quantized

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("n,k,m", [(70, 130, 5), (33, 67, 40), (128, 64, 17)])
def test_both_directions_match_fp64_reference(n, k, m, dtype, nested):
    p = quantized((n, k), dtype, nested)
    w = nf4_weight_from_bnb(p)
    ref_w = reference_dequantize(p).double()
    x = torch.randn(m, k, dtype=dtype)
    dy = torch.randn(m, n, dtype=dtype)
    y = nf4_matmul(x, w, transpose_weight=True)
    dx = nf4_matmul(dy, w, transpose_weight=False)
    assert y.dtype == dtype and y.shape == (m, n) and dx.shape == (m, k)
    assert rel_err(y, x.double() @ ref_w.t()) < TOLERANCE[dtype]
    assert rel_err(dx, dy.double() @ ref_w) < TOLERANCE[dtype]


def test_strided_input():
    p = quantized((64, 96), torch.float16, True)
    x = torch.randn(96, 10, dtype=torch.float16).t()  # non-contiguous view
    ref = x.double() @ reference_dequantize(p).double().t()
    assert rel_err(nf4_matmul(x, nf4_weight_from_bnb(p)), ref) < TOLERANCE[torch.float16]


def test_wrong_input_width_is_refused():
    p = quantized((64, 96), torch.float16, True)
    with pytest.raises(ValueError, match="96 columns"):
        nf4_matmul(torch.randn(3, 95, dtype=torch.float16), nf4_weight_from_bnb(p))

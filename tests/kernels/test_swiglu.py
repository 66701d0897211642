import pytest
import torch

from qlora_fast.kernels.swiglu import swiglu_backward_, swiglu_forward
from tests.helpers import rel_err


def torch_swiglu(g, u, dh):
    """What the stock MLP computes: act_fn(gate) * up, and its autograd gradients."""
    g = g.clone().requires_grad_(True)
    u = u.clone().requires_grad_(True)
    h = torch.nn.functional.silu(g) * u
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# not multiples of the block (1024 elements on the GPU, 2^16 in the interpreter), one crossing it
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 2500), (2, 33000)])
def test_matches_torch(dtype, shape):
    g = (torch.randn(shape) * 3).to(dtype)
    u = torch.randn(shape).to(dtype)
    dh = torch.randn(shape).to(dtype)
    h_ref, dg_ref, du_ref = torch_swiglu(g, u, dh)

    h = swiglu_forward(g, u)
    # The same fp32 formula rounded at the same points as torch on the GPU (bench/kernels.py checks it
    # bit for bit in bf16 there); torch's CPU fp16 silu rounds a few elements differently: two fp16 ulps allowed
    # (one on silu(g), carried into the product).
    two_ulps = {torch.float16: dict(rtol=2**-9, atol=2**-24)}.get(dtype, {})
    torch.testing.assert_close(h, h_ref, **two_ulps)

    h2, dg, du = swiglu_backward_(dh.clone(), g.clone(), u.clone())
    assert torch.equal(h2, h)
    # dg's fp32 formula differs from torch's silu_backward in the last bit before rounding
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(dg, dg_ref) < tolerance
    assert rel_err(du, du_ref) < tolerance


def test_backward_overwrites_its_inputs_and_bumps_their_version():
    g, u, dh = torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40)
    versions = [t._version for t in (dh, g, u)]
    outputs = swiglu_backward_(dh, g, u)
    assert all(o is t for o, t in zip(outputs, (dh, g, u)))
    assert [t._version for t in (dh, g, u)] == [v + 1 for v in versions]


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu_forward(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16))

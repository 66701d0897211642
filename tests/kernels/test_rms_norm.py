import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_fast.ops.rms_norm import add_rms_norm, rms_norm
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


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32)])
@pytest.mark.parametrize("rows,cols", [(21, 100), (1100, 64)])
def test_matches_transformers_gemma_rms_norm(x_dtype, w_dtype, rows, cols):
    """Gemma's (1 + w), all in fp32, y in x's dtype; Llama's arithmetic on the same weight fails the check."""
    norm = GemmaRMSNorm(cols, eps=1e-6).to(w_dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    x = (torch.randn(rows, cols) * 3).to(x_dtype)
    grad_out = torch.randn(rows, cols).to(x_dtype)
    x_ref = x.clone().requires_grad_(True)
    y_ref = norm(x_ref)
    y_ref.backward(grad_out)
    x_ours = x.clone().requires_grad_(True)
    y_ours = rms_norm(x_ours, norm.weight, norm.eps, offset_weight=True)
    y_ours.backward(grad_out)
    assert y_ours.dtype == y_ref.dtype == x_dtype and x_ours.grad.dtype == x_dtype
    torch.testing.assert_close(y_ours, y_ref)
    tolerance = 1e-5 if x_dtype == torch.float32 else 1e-2
    assert rel_err(x_ours.grad, x_ref.grad) < tolerance
    assert rel_err(rms_norm(x, norm.weight, norm.eps).to(x_dtype), y_ref) > 0.1


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 100), (1100, 64)])
def test_add_rms_norm_is_torch_add_then_the_norm_bit_for_bit(dtype, with_delta, shape):
    """The sum, its norm and the summed gradient of the residual are exactly what torch's add, the norm
    kernel alone and autograd's sum of the two gradients give."""
    weight = torch.randn(shape[-1]).mul(0.2).add(1.0).to(dtype)
    residual, delta = (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype)
    grad_total, grad_normed = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)

    residual_ref, delta_ref = _leaf(residual), _leaf(delta)
    total_ref = residual_ref + delta_ref if with_delta else residual_ref
    normed_ref = rms_norm(total_ref, weight, 1e-5)
    torch.autograd.backward([total_ref, normed_ref], [grad_total, grad_normed])

    residual_ours, delta_ours = _leaf(residual), _leaf(delta)
    total, normed = add_rms_norm(residual_ours, delta_ours if with_delta else None, weight, 1e-5)
    torch.autograd.backward([total, normed], [grad_total, grad_normed])

    assert torch.equal(total, total_ref) and torch.equal(normed, normed_ref)
    assert torch.equal(residual_ours.grad, residual_ref.grad)
    if with_delta:
        assert torch.equal(delta_ours.grad, delta_ref.grad)


def test_add_rms_norm_of_mixed_dtypes_adds_as_torch_promotes():
    residual, delta = torch.randn(5, 40).to(torch.bfloat16), torch.randn(5, 40)
    weight = torch.ones(40)
    total, normed = add_rms_norm(residual, delta, weight, 1e-6)
    assert total.dtype == torch.float32 and torch.equal(total, residual + delta)
    assert torch.equal(normed, rms_norm(residual + delta, weight, 1e-6))


class CastCount(TorchDispatchMode):
    """Counts the conversions from one floating dtype to another run under it (Triton's CPU interpreter
    copies its arguments, in their dtypes)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source, target = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            self.count += source.dtype.is_floating_point and source.dtype != target.dtype
        return out


def test_narrower_delta_is_added_inside_the_kernel_as_torch_adds_it(monkeypatch):
    """A bf16 sublayer output added to an fp32 residual stream (a prepared model): in the kernel, the sum,
    its norm and both gradients (the delta's rounded to bf16) bit for bit as torch's promoting add gives."""
    from qlora_fast.ops import rms_norm as ops_rms_norm

    deltas_in_kernel = []
    kernel_forward = ops_rms_norm.add_rms_norm_forward
    monkeypatch.setattr(ops_rms_norm, "add_rms_norm_forward",
                        lambda x, d, *a, **k: deltas_in_kernel.append(d) or kernel_forward(x, d, *a, **k))
    shape = (3, 7, 100)
    weight = torch.randn(shape[-1]).mul(0.2).add(1.0)
    residual, delta = torch.randn(shape) * 3, torch.randn(shape).to(torch.bfloat16)
    grad_total, grad_normed = torch.randn(shape), torch.randn(shape)

    residual_ref, delta_ref = _leaf(residual), _leaf(delta)
    total_ref = residual_ref + delta_ref
    normed_ref = rms_norm(total_ref, weight, 1e-5)
    torch.autograd.backward([total_ref, normed_ref], [grad_total, grad_normed])

    residual_ours, delta_ours = _leaf(residual), _leaf(delta)
    total, normed = add_rms_norm(residual_ours, delta_ours, weight, 1e-5)
    with CastCount() as casts:  # the delta's bf16 gradient comes from the kernel, not from a cast of its fp32 one
        torch.autograd.backward([total, normed], [grad_total, grad_normed])

    assert casts.count == 0
    assert deltas_in_kernel and deltas_in_kernel[0].dtype == torch.bfloat16
    assert total.dtype == torch.float32 and torch.equal(total, total_ref) and torch.equal(normed, normed_ref)
    assert torch.equal(residual_ours.grad, residual_ref.grad)
    assert delta_ours.grad.dtype == torch.bfloat16 and torch.equal(delta_ours.grad, delta_ref.grad)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_norm_written_narrower_is_the_stock_norm_rounded(out_dtype):
    """The fp32 norm of an fp32 residual written in the consumer's compute dtype: one rounding of the
    stock output, and the gradient of a narrower grad_normed the same as of its fp32 copy."""
    weight = torch.randn(100).mul(0.2).add(1.0)
    residual = torch.randn(1100, 100) * 3
    grad_normed = torch.randn(1100, 100).to(out_dtype)
    wide_residual, narrow_residual = _leaf(residual), _leaf(residual)
    _, wide = add_rms_norm(wide_residual, None, weight, 1e-5)
    _, narrow = add_rms_norm(narrow_residual, None, weight, 1e-5, out_dtype=out_dtype)
    assert wide.dtype == torch.float32 and narrow.dtype == out_dtype
    assert torch.equal(narrow, wide.to(out_dtype)) and not torch.equal(wide, wide.to(out_dtype).float())
    wide.backward(grad_normed.float())
    narrow.backward(grad_normed)
    assert torch.equal(narrow_residual.grad, wide_residual.grad)

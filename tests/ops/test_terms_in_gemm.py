"""LoRA terms carried in the base GEMM (K widened) against float64 references from bitsandbytes' decode,
and the fused MLP taking that path where it may."""

import pytest
import torch

from qlora_fast import patch_model
from qlora_fast.kernels import swiglu
from qlora_fast.nf4 import nf4_weight_from_bnb
from qlora_fast.ops import lora_nf4_mlp
from qlora_fast.ops.terms_in_gemm import gate_up_with_terms, input_grad_with_term, terms_fit_in_gemm
from qlora_fast.testing import make_nf4_linear
from tests.helpers import reference_dequantize, rel_err
from tests.ops.test_lora_nf4_mlp import TOLERANCE as MLP_TOLERANCE, forward_backward, qlora_mlp

# One rounding of each output to the compute dtype, and s * xa rounded to it before the GEMM
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def nf4_and_reference(out_features, in_features, dtype):
    layer = make_nf4_linear(out_features, in_features, dtype)
    return nf4_weight_from_bnb(layer.weight), reference_dequantize(layer.weight).double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_and_up_with_their_terms(dtype):
    rows, width, out_features, rank = 37, 128, 192, 40
    (w_gate, ref_gate), (w_up, ref_up) = (nf4_and_reference(out_features, width, dtype) for _ in range(2))
    x = torch.randn(rows, width, dtype=torch.float32)  # any float dtype: written into the wide buffer as dtype
    a = torch.randn(2 * rank, width, dtype=dtype) * 0.1
    b_gate, b_up = (torch.randn(out_features, rank, dtype=dtype) * 0.1 for _ in range(2))
    x2, xa_gate, xa_up, g, u = gate_up_with_terms(x, a, (b_gate, 0.5, w_gate), (b_up, 3.0, w_up), dtype)

    x64 = x.to(dtype).double()
    assert torch.equal(x2, x.to(dtype)) and x2.dtype == g.dtype == u.dtype == dtype
    xa = x64 @ a.double().t()
    assert rel_err(torch.cat([xa_gate, xa_up], 1), xa) < TOLERANCE[dtype]
    assert rel_err(g, x64 @ ref_gate.t() + 0.5 * xa[:, :rank] @ b_gate.double().t()) < TOLERANCE[dtype]
    assert rel_err(u, x64 @ ref_up.t() + 3.0 * xa[:, rank:] @ b_up.double().t()) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_gradient_with_its_term(dtype):
    rows, width, out_features, rank = 37, 192, 128, 40
    w, ref = nf4_and_reference(out_features, width, dtype)
    grad_out = torch.randn(rows, out_features, dtype=dtype)
    a = torch.randn(rank, width, dtype=dtype) * 0.1
    b = torch.randn(out_features, rank, dtype=dtype) * 0.1
    dy, dy_b, dx = input_grad_with_term(grad_out, b, a, 2.0, w)

    dy64 = grad_out.double()
    assert torch.equal(dy, grad_out)
    assert rel_err(dy_b, dy64 @ b.double()) < TOLERANCE[dtype]
    assert rel_err(dx, dy64 @ ref + 2.0 * (dy64 @ b.double()) @ a.double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("rank, fits", [(16, False), (32, False), (40, True), (64, True), (36, False)])
def test_ranks_past_the_in_kernel_sums_and_multiples_of_8_fit(rank, fits):
    weight = nf4_weight_from_bnb(make_nf4_linear(64, 128).weight)
    assert terms_fit_in_gemm(torch.randn(4, 128), rank, [weight]) is fits


def test_rows_of_partial_quantization_blocks_do_not_fit():
    weight = nf4_weight_from_bnb(make_nf4_linear(64, 96).weight)
    assert not terms_fit_in_gemm(torch.randn(4, 96), 64, [weight])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_of_large_rank_adds_no_term_in_its_kernels(dtype, monkeypatch):
    """At r=40 gate's and up's terms ride in their GEMMs and dh's in its own: the SwiGLU kernels get none,
    and the MLP still matches the stock one (tests/ops/test_lora_nf4_mlp.py holds the tolerances)."""
    model, mlp = qlora_mlp(dtype, r=40, lora_alpha=80)
    x, grad_out = torch.randn(2, 9, 64, dtype=dtype), torch.randn(2, 9, 64, dtype=dtype)
    y_ref, dx_ref, _, _ = forward_backward(mlp, x, grad_out)
    seen = []
    forward, backward = swiglu.swiglu_forward, swiglu.swiglu_backward_writing_h_
    monkeypatch.setattr(lora_nf4_mlp, "swiglu_forward", lambda g, u, *terms, **kw: seen.append(terms) or
                        forward(g, u, *terms, **kw))
    monkeypatch.setattr(lora_nf4_mlp, "swiglu_backward_writing_h_", lambda dh, g, u, *terms, **kw:
                        seen.append(terms) or backward(dh, g, u, *terms, **kw))
    patch_model(model)
    y, dx, _, _ = forward_backward(mlp, x, grad_out)
    assert seen == [(), ()]
    assert rel_err(y, y_ref) < MLP_TOLERANCE[dtype] and rel_err(dx, dx_ref) < MLP_TOLERANCE[dtype]


@pytest.mark.parametrize("output_read, fits", [(True, False), (False, True)])
def test_a_wider_input_fits_only_where_the_output_is_not_read(output_read, fits):
    """A prepared model's fp32 hidden states: stock's fp32 sum must survive in any output read; a checkpoint's
    recompute only feeds the backward (tests/test_prepared_model.py runs both against stock)."""
    weight = nf4_weight_from_bnb(make_nf4_linear(64, 128).weight)
    assert terms_fit_in_gemm(torch.randn(4, 128), 64, [weight], wide=True, output_read=output_read) is fits

"""The fused gated MLP (SwiGLU, GeGLU) against the stock MLP over peft's LoRA layers, on the same module."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.patching import mlp as mlp_patching
from tests.helpers import rel_err

# As for one LoRA layer (test_lora_nf4_linear): the fused path keeps the LoRA products in the compute
# dtype where peft upcasts them to fp32.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def qlora_mlp(dtype, shape="tiny-llama", **lora):
    model = add_lora(quantize_to_nf4_(random_causal_lm(shape, dtype), compute_dtype=dtype), init_b_std=0.02,
                     **lora).train()
    return model, model.base_model.model.model.layers[0].mlp


def forward_backward(mlp, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    y = mlp(x)
    y.backward(grad_out)
    grads = {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads, type(y.grad_fn).__name__


SHAPES = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-gemma2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# every shape at r=16 (gradients summed in the SwiGLU kernel); Llama's also at ranks padded to 64 and 128
# (h written, the gradients' GEMMs; with inputs in the compute dtype, the terms in the GEMMs), Gemma's
# GeGLU at 40
@pytest.mark.parametrize("shape, rank, alpha", [(shape, 16, 16) for shape in SHAPES]
                         + [("tiny-llama", 40, 80), ("tiny-llama", 72, 144), ("tiny-gemma", 40, 80)])
def test_matches_stock_mlp(dtype, shape, rank, alpha):
    model, mlp = qlora_mlp(dtype, shape, r=rank, lora_alpha=alpha)
    x = torch.randn(2, 9, 64, dtype=dtype)
    grad_out = torch.randn(2, 9, 64, dtype=dtype)
    y_ref, dx_ref, grads_ref, _ = forward_backward(mlp, x, grad_out)
    assert patch_model(model).mlps == 2
    y, dx, grads, grad_fn = forward_backward(mlp, x, grad_out)
    assert grad_fn == "LoRANF4MLPFunctionBackward"
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
    assert rel_err(y, y_ref) < TOLERANCE[dtype] and rel_err(dx, dx_ref) < TOLERANCE[dtype]
    assert grads.keys() == grads_ref.keys() and len(grads) == 6  # A and B of gate, up, down
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype == torch.float32
        assert grads[name].shape == grads_ref[name].shape
        assert rel_err(grads[name], grads_ref[name]) < TOLERANCE[dtype], name


def fused_grad_fn(mlp, x):
    return type(mlp(x).grad_fn).__name__


def test_dropout_disabled_adapter_and_hooks_take_the_stock_mlp():
    model, mlp = qlora_mlp(torch.float32)
    patch_model(model)
    x = torch.randn(3, 64, requires_grad=True)
    assert fused_grad_fn(mlp, x) == "LoRANF4MLPFunctionBackward"
    with model.disable_adapter():
        assert fused_grad_fn(mlp, x) != "LoRANF4MLPFunctionBackward"
    handle = mlp.up_proj.register_forward_hook(lambda *args: None)
    assert fused_grad_fn(mlp, x) != "LoRANF4MLPFunctionBackward"
    handle.remove()

    model, mlp = qlora_mlp(torch.float32, lora_dropout=0.1)
    patch_model(model)
    assert fused_grad_fn(mlp, x) == "LoRANF4LinearFunctionBackward"  # down_proj alone, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_run_as_swiglu_fails_the_comparison(monkeypatch, dtype):
    """The parity check can fail: Gemma's MLP fused with SiLU in place of its GELU is caught."""
    model, mlp = qlora_mlp(dtype, "tiny-gemma")
    x, grad_out = torch.randn(2, 9, 64, dtype=dtype), torch.randn(2, 9, 64, dtype=dtype)
    y_ref, dx_ref, _, _ = forward_backward(mlp, x, grad_out)
    monkeypatch.setattr(mlp_patching, "activation_name", lambda act_fn: "silu")
    assert patch_model(model).mlps == 2
    y, dx, _, _ = forward_backward(mlp, x, grad_out)
    assert rel_err(y, y_ref) > TOLERANCE[dtype] and rel_err(dx, dx_ref) > TOLERANCE[dtype]


def test_only_gated_mlps_with_all_three_projections_are_fused():
    from transformers.activations import GELUTanh

    model, mlp = qlora_mlp(torch.float32, "tiny-gemma")
    for layer in model.base_model.model.model.layers:  # the Python spelling rounds each step: not ours
        layer.mlp.act_fn = GELUTanh(use_gelu_tanh_python=True)
    assert patch_model(model).mlps == 0
    model, _ = qlora_mlp(torch.float32, target_modules=["gate_proj", "down_proj"])
    assert patch_model(model).mlps == 0
    model, _ = qlora_mlp(torch.float32)
    assert patch_model(model, fused_mlp=False).mlps == 0


def test_unpatch_restores_the_mlp():
    model, mlp = qlora_mlp(torch.float32)
    patch_model(model)
    assert unpatch_model(model) == 14
    assert "forward" not in vars(mlp)


def test_summary_names_the_fused_mlps():
    model, _ = qlora_mlp(torch.float32)
    assert "(2 gated MLPs and 2 q/k/v triples fused whole)" in patch_model(model).summary()
    unpatch_model(model)
    assert "(2 gated MLPs fused whole)" in patch_model(model, fused_qkv=False).summary()


def qlora_mlp_with_patterns(dtype, **patterns):
    from peft import LoraConfig, get_peft_model

    model = quantize_to_nf4_(random_causal_lm("tiny-llama", dtype), compute_dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", **patterns))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train(), model.base_model.model.model.layers[0].mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_and_up_with_different_scalings(dtype):
    """Two scalings: the A gradients take a GEMM each and dX's LoRA terms ride on a scaled copy of A."""
    model, mlp = qlora_mlp_with_patterns(dtype, alpha_pattern={"gate_proj": 64})
    assert mlp.gate_proj.scaling["default"] != mlp.up_proj.scaling["default"]
    x, grad_out = torch.randn(2, 9, 64, dtype=dtype), torch.randn(2, 9, 64, dtype=dtype)
    y_ref, dx_ref, grads_ref, _ = forward_backward(mlp, x, grad_out)
    patch_model(model)
    y, dx, grads, grad_fn = forward_backward(mlp, x, grad_out)
    assert grad_fn == "LoRANF4MLPFunctionBackward"
    assert rel_err(y, y_ref) < TOLERANCE[dtype] and rel_err(dx, dx_ref) < TOLERANCE[dtype]
    assert all(rel_err(grads[n], grads_ref[n]) < TOLERANCE[dtype] for n in grads_ref)


def test_gate_and_up_of_different_ranks_go_one_projection_at_a_time():
    """The SwiGLU kernel adds both terms with one rank: other ranks keep the fused layers, one by one."""
    model, mlp = qlora_mlp_with_patterns(torch.float32, rank_pattern={"up_proj": 8})
    x, grad_out = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    y_ref, dx_ref, grads_ref, _ = forward_backward(mlp, x, grad_out)
    patch_model(model)
    y, dx, grads, grad_fn = forward_backward(mlp, x, grad_out)
    assert grad_fn == "LoRANF4LinearFunctionBackward"
    assert rel_err(y, y_ref) < 1e-5 and rel_err(dx, dx_ref) < 1e-5
    assert all(rel_err(grads[n], grads_ref[n]) < 1e-5 for n in grads_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("narrowed", [False, True], ids=["x as is", "x narrowed from fp32"])
def test_residual_added_inside_is_torchs_add_of_the_output(dtype, narrowed):
    """The decoder layer's residual + mlp(x) with the residual added where the down projection's term is:
    bit for bit torch's add of the fused MLP's output (each sum rounded to the output's dtype), gradients
    included (the residual's is the output's). On x narrowed from fp32 (a prepared model) the output and
    the residual are fp32. A residual of another dtype leaves the add to torch."""
    from qlora_fast.patching.core import NARROWED_FROM

    model, mlp = qlora_mlp(dtype)
    patch_model(model)
    wide = torch.float32 if narrowed else dtype
    x, residual = torch.randn(2, 9, 64, dtype=dtype), torch.randn(2, 9, 64, dtype=wide) * 8
    grad_out = torch.randn(2, 9, 64, dtype=wide)

    def step(fn):
        mlp.zero_grad(set_to_none=True)
        x_, residual_ = x.clone().requires_grad_(True), residual.clone().requires_grad_(True)
        if narrowed:
            setattr(x_, NARROWED_FROM, torch.float32)
        out = fn(x_, residual_)
        out.backward(grad_out)
        return [out.detach(), x_.grad, residual_.grad] + [p.grad for p in mlp.parameters() if p.grad is not None]

    reference = step(lambda x_, residual_: residual_ + mlp(x_))
    ours = step(lambda x_, residual_: mlp_patching.mlp_plus_residual(mlp, x_, residual_))
    assert ours[0].dtype == wide and len(ours) == len(reference) == 9
    assert all(torch.equal(o, r) for o, r in zip(ours, reference))
    assert mlp_patching.mlp_plus_residual(mlp, x, residual.to(torch.float16)) is None

"""verify() passes the patched model and fails every mutant of it, in bf16: a LoRA term dropped or its
scaling doubled in the single linear, the fused MLP and the fused q/k/v; and it fails when the fused path
did not run."""

import pytest
import torch

from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.verify import verify
from tests.helpers import doubled_gate_term


def tiny(dtype=torch.bfloat16, **lora):
    # alpha != r everywhere and another alpha on down_proj: three different scalings in one model
    lora = {"r": 16, "lora_alpha": 32, "alpha_pattern": {"down_proj": 8}, **lora}
    return add_lora(quantize_to_nf4_(random_causal_lm("tiny-llama", dtype), compute_dtype=dtype), **lora)


def batches(n=2):
    return [{"input_ids": (ids := torch.randint(0, 512, (2, 24))), "labels": ids} for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_patched_model_passes(dtype):
    model = tiny(dtype)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {2.0, 0.5}
    report = verify(model, batches(), dtype)
    assert report.passed, report.verdict()
    assert {"linear", "mlp", "qkv", "rope", "loss", "rms_norm"} <= set(report.calls)
    assert len(report.matrices) == 28


def test_packed_rows_pass_with_packed_attention():
    position_ids = torch.cat([torch.arange(n) for n in (9, 5, 10)])[None]
    packed = [{"input_ids": (ids := torch.randint(0, 512, (1, 24))), "labels": ids, "position_ids": position_ids,
               "use_cache": False}]
    report = verify(tiny(), packed, torch.bfloat16)
    assert report.passed, report.verdict()
    assert report.calls["packed_attention"] == 2


def _dropped_terms(real):
    return lambda y, blocks, out_dtype, **kw: y.to(out_dtype)


def _doubled_terms(real):
    return lambda y, blocks, out_dtype, **kw: real(y, [(b, t._replace(scale=2 * t.scale)) for b, t in blocks], out_dtype,
                                                  **kw)


def _dropped_up_term(real):
    return lambda g, u, gate_term=None, up_term=None, **kw: real(g, u, gate_term, None, **kw)


MUTANTS = {  # name: (patch_model options, function replaced, mutant of it)
    "linear, term dropped": ({"fused_mlp": False, "fused_qkv": False}, "lora_nf4_linear.plus_low_rank_terms",
                             _dropped_terms),
    "linear, scaling doubled": ({"fused_mlp": False, "fused_qkv": False}, "lora_nf4_linear.plus_low_rank_terms",
                                _doubled_terms),
    "mlp, up term dropped": ({}, "lora_nf4_mlp.swiglu_forward", _dropped_up_term),
    "mlp, gate scaling doubled": ({}, "lora_nf4_mlp.swiglu_forward", doubled_gate_term),
    "qkv, terms dropped": ({}, "lora_nf4_qkv.plus_low_rank_terms", _dropped_terms),
    "qkv, scaling doubled": ({}, "lora_nf4_qkv.plus_low_rank_terms", _doubled_terms),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_mutant_fails_in_bf16(mutant, monkeypatch):
    import importlib

    options, target, mutate = MUTANTS[mutant]
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(f"qlora_fast.ops.{module_name}")
    monkeypatch.setattr(module, attr, mutate(getattr(module, attr)))
    report = verify(tiny(), batches(1), torch.bfloat16, **options)
    assert not report.passed
    assert "LoRA gradients off" in report.verdict()


def test_a_fallback_fails_verification():
    model = tiny()
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    layer.base_layer.register_forward_hook(lambda *args: None)  # e.g. accelerate's offload hook
    report = verify(model, batches(1), torch.bfloat16)
    assert not report.passed and "fell back to peft: hooks on the base layer" in report.verdict()


def test_nothing_patched_fails_verification():
    model = add_lora(random_causal_lm("tiny-llama", torch.bfloat16), init_b_std=0.02)  # LoRA over a bf16 base
    report = verify(model, batches(1), torch.bfloat16)
    assert not report.passed and "no LoRA layer was patched" in report.verdict()

"""patch_model / unpatch_model as a whole: parity, warnings, idempotence, restoring."""

import warnings

import pytest
import torch

from qlora_fast import is_patched, patch_model, unpatch_model
from qlora_fast.harness.models import random_causal_lm
from tests.helpers import loss_and_grads, rel_err, tiny_qlora


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"])
def test_same_loss_and_lora_grads_patched_and_unpatched(shape):
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 24))
    stock_loss, stock_grads = loss_and_grads(model, ids)
    report = patch_model(model)
    assert report.patched == 14 and not report.skipped  # 2 layers x 7 projections
    fused_loss, fused_grads = loss_and_grads(model, ids)
    assert fused_loss == pytest.approx(stock_loss, rel=1e-5)
    assert stock_grads.keys() == fused_grads.keys() and len(stock_grads) == 28
    for name in stock_grads:
        assert rel_err(fused_grads[name], stock_grads[name]) < 1e-4, name


def test_bf16_loss_parity_with_dropout():
    model = tiny_qlora(dtype=torch.bfloat16, lora_dropout=0.1).train()
    ids = torch.randint(0, 512, (2, 24))
    stock_loss, _ = loss_and_grads(model, ids)
    patch_model(model)
    assert loss_and_grads(model, ids)[0] == pytest.approx(stock_loss, rel=1e-2)


def test_unpatch_restores_stock_forward_exactly():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (1, 16))
    stock = loss_and_grads(model, ids)[0]
    patch_model(model)
    patch_model(model)  # idempotent
    assert unpatch_model(model) == 14
    assert not any(is_patched(m) for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())
    assert loss_and_grads(model, ids)[0] == stock


def test_no_warning_when_everything_is_patched():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(tiny_qlora())


def test_a_model_without_lora_nf4_layers_is_left_alone_with_one_line():
    model = random_causal_lm("tiny-llama", torch.float32)  # no adapter yet (patch_model before get_peft_model)
    with pytest.warns(UserWarning, match="found no peft LoRA layer .* nothing was patched") as caught:
        report = patch_model(model)
    assert len(caught) == 1 and report.patched == 0 and not report.chunked_loss and not report.rms_norms
    assert not any(is_patched(m) for m in model.modules())


def test_patched_model_runs_under_torch_compile():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (1, 16))
    stock = model(input_ids=ids, labels=ids).loss
    patch_model(model)
    compiled = torch.compile(model, backend="aot_eager")
    assert compiled(input_ids=ids, labels=ids).loss.item() == pytest.approx(stock.item(), rel=1e-5)


def test_an_instance_level_wrapper_from_another_library_is_kept():
    model = tiny_qlora().train()
    lm = model.get_base_model()
    calls = []
    stock = lm.forward

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("fused_lm_head"))
        kwargs.pop("fused_lm_head", None)
        return stock(*args, **kwargs)

    lm.forward = wrapper  # as TRL wraps the forward to serve fused_lm_head
    patch_model(model)
    ids = torch.randint(0, 512, (1, 8))
    model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert calls == [True]
    unpatch_model(model)
    assert lm.forward is wrapper


def test_generation_and_hidden_states_through_patched_layers():
    """A KV cache through the patched decoder layers, and every layer's output (hidden states) read."""
    model = tiny_qlora().eval()
    ids, mask = torch.randint(0, 512, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        stock_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        patch_model(model)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(generated, stock)
    assert len(hidden) == len(stock_hidden) == 3
    assert all(rel_err(h, s) < 1e-5 for h, s in zip(hidden, stock_hidden))

"""patching/projections.py: which adapter state, weight and hooks a layer call can serve fused."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qlora_fast import patch_model, unpatch_model
from qlora_fast.patching import core, projections
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.testing import make_lora_nf4_linear
from tests.helpers import loss_and_grads, patched_keeps_loss_and_grads, tiny_qlora


def test_second_adapter_is_served_when_active_and_ignored_when_not():
    model = tiny_qlora().train()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 512, (1, 16))
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        unpatch_model(model)
        stock = loss_and_grads(model, ids)[0]
        patch_model(model)
        assert loss_and_grads(model, ids)[0] == pytest.approx(stock, rel=1e-5)


def test_mixed_batch_adapter_names_take_peft_path():
    model = tiny_qlora().eval()  # peft serves adapter_names in inference only
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 512, (2, 8))
    names = ["default", "other"]
    with torch.no_grad():
        stock = model(input_ids=ids, adapter_names=names).logits
        patch_model(model, rms_norm=False)  # the norm kernel sums rows in another order: not bit-equal
        assert torch.equal(model(input_ids=ids, adapter_names=names).logits, stock)


def test_adapters_sharded_apart_from_their_layer_take_peft_path_with_one_warning():
    layer = make_lora_nf4_linear(64, 128, dtype=torch.float32)
    assert projections.fused_projection(layer).adapter == "default"
    # FSDP1's placeholder for a parameter that lives in another unit's flat parameter
    layer.lora_A["default"].weight = torch.nn.Parameter(torch.empty(0))
    core._warned.clear()
    with pytest.warns(UserWarning, match="FSDP shards the LoRA adapters") as caught:
        assert projections.fused_projection(layer) is None
        assert projections.fused_projection(layer) is None
    assert len(caught) == 1


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_floating_point_quant_storage_as_fsdp_qlora_stores_it(storage):
    model = quantize_to_nf4_(random_causal_lm("tiny-llama", torch.float32), compute_dtype=torch.float32,
                             quant_storage=storage)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == storage
    assert layer.quant_state is layer.weight.quant_state  # what FSDP's re-created weight gets back
    model = add_lora(model, init_b_std=0.02).train()
    ids = torch.randint(0, 512, (2, 16))
    assert patched_keeps_loss_and_grads(model, ids).patched == 14


def test_disabled_adapter_and_merged_state_fall_back_to_peft():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (1, 16))
    patch_model(model)
    with model.disable_adapter():
        disabled = model(input_ids=ids, labels=ids).loss.item()
    unpatch_model(model)
    with model.disable_adapter():
        assert model(input_ids=ids, labels=ids).loss.item() == disabled


def test_call_time_paths_are_said_once_per_reason():
    model = tiny_qlora().train()
    patch_model(model, verbose=False)
    core._warned.clear()
    core.reset_call_counts()
    ids = torch.randint(0, 512, (1, 16))
    with pytest.warns(UserWarning, match="adapter disabled or merged run on peft's path, as asked") as caught:
        with model.disable_adapter():
            model(input_ids=ids, labels=ids)
            model(input_ids=ids, labels=ids)
    assert len([w for w in caught if "as asked" in str(w.message)]) == 1
    assert core.CALLS["peft path as asked: adapter disabled or merged"] > 0
    assert not any(k.startswith("fallback") for k in core.CALLS)  # verify() does not count these against it


def test_fp4_layer_is_skipped():
    layer = make_lora_nf4_linear(64, 128, quant_type="fp4")
    with pytest.warns(UserWarning, match="quant_type fp4"):
        assert patch_model(layer).patched == 0


def test_dora_layers_stay_stock_with_one_warning_line():
    model = quantize_to_nf4_(random_causal_lm("tiny-llama", torch.float32), compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with pytest.warns(UserWarning) as caught:
        report = patch_model(model)
    assert report.patched == 0 and report.skipped == {"LoRA variant Dora": 4}
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "kept 4 on the stock peft path" in str(caught[0].message)


@pytest.mark.parametrize("where", ["base_layer", "lora_A"])
def test_accelerate_hooks_send_the_layer_to_peft(where):
    """accelerate's hooks (offload: they move weights in when the module is called) run only on peft's path."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    layer = make_lora_nf4_linear(64, 64, dtype=torch.float32)
    hooked = layer.base_layer if where == "base_layer" else layer.lora_A["default"]
    assert projections.fused_projection(layer) is not None
    add_hook_to_module(hooked, ModelHook())
    core.CALLS.clear()
    assert projections.fused_projection(layer) is None
    assert any(key.startswith("fallback: hooks") for key in core.CALLS)
    remove_hook_from_module(hooked)
    assert projections.fused_projection(layer) is not None

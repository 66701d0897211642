import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qlora_fast import is_patched, patch_model, unpatch_model
from qlora_fast.patching import core, norms, projections
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.ops.rope import RoPEFunction
from qlora_fast.ops.unread_sum import unread_sum
from qlora_fast.testing import make_lora_nf4_linear
from tests.helpers import rel_err


def tiny_qlora(shape="tiny-llama", dtype=torch.float32, **lora):
    model = quantize_to_nf4_(random_causal_lm(shape, dtype), compute_dtype=dtype)
    return add_lora(model, init_b_std=0.02, **lora)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def patched_keeps_loss_and_grads(model, ids, **options):
    """Patches `model` with `options` between a stock and a patched fwd+bwd that must agree (fp32
    model: 1e-5 on the loss, 1e-4 on every LoRA gradient); returns the PatchReport."""
    stock_loss, stock_grads = loss_and_grads(model, ids)
    report = patch_model(model, **options)
    loss, grads = loss_and_grads(model, ids)
    assert loss == pytest.approx(stock_loss, rel=1e-5)
    assert grads.keys() == stock_grads.keys()
    assert all(rel_err(grads[n], stock_grads[n]) < 1e-4 for n in stock_grads)
    return report


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


def test_qwen2_qkv_bias_is_patched():
    model = tiny_qlora("tiny-qwen2")
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    assert patch_model(model).patched == 14


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


def test_dora_layers_stay_stock_with_one_warning_line():
    model = quantize_to_nf4_(random_causal_lm("tiny-llama", torch.float32), compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with pytest.warns(UserWarning) as caught:
        report = patch_model(model)
    assert report.patched == 0 and report.skipped == {"LoRA variant Dora": 4}
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "kept 4 on the stock peft path" in str(caught[0].message)


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


def test_fp4_layer_is_skipped():
    layer = make_lora_nf4_linear(64, 128, quant_type="fp4")
    with pytest.warns(UserWarning, match="quant_type fp4"):
        assert patch_model(layer).patched == 0


def test_disabled_adapter_and_merged_state_fall_back_to_peft():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (1, 16))
    patch_model(model)
    with model.disable_adapter():
        disabled = model(input_ids=ids, labels=ids).loss.item()
    unpatch_model(model)
    with model.disable_adapter():
        assert model(input_ids=ids, labels=ids).loss.item() == disabled


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


def test_patched_model_runs_under_torch_compile():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (1, 16))
    stock = model(input_ids=ids, labels=ids).loss
    patch_model(model)
    compiled = torch.compile(model, backend="aot_eager")
    assert compiled(input_ids=ids, labels=ids).loss.item() == pytest.approx(stock.item(), rel=1e-5)


def test_chunked_loss_in_training_full_logits_elsewhere():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (2, 16))
    report = patch_model(model)
    assert report.chunked_loss and "LM loss (chunked" in report.summary()
    assert model(input_ids=ids, labels=ids).logits is None
    assert model(input_ids=ids).logits.shape == (2, 16, 512)
    model.eval()
    assert model(input_ids=ids, labels=ids).logits is not None
    unpatch_model(model)
    model.train()
    assert model(input_ids=ids, labels=ids).logits is not None


def test_lm_head_with_hooks_keeps_the_stock_loss():
    model = tiny_qlora().train()
    patch_model(model)
    ids = torch.randint(0, 512, (1, 8))
    calls = []
    model.base_model.model.lm_head.register_forward_pre_hook(lambda *a: calls.append(1))  # as FSDP's gathers
    assert model(input_ids=ids, labels=ids).logits is not None and calls == [1]


def test_chunked_loss_can_be_left_out():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (1, 8))
    assert not patch_model(model, chunked_loss=False).chunked_loss
    assert model(input_ids=ids, labels=ids).logits is not None


def test_chunked_loss_respects_num_items_in_batch():
    model = tiny_qlora().train()
    ids = torch.randint(0, 512, (2, 16))
    stock = model(input_ids=ids, labels=ids, num_items_in_batch=50).loss
    patch_model(model)
    assert model(input_ids=ids, labels=ids, num_items_in_batch=50).loss.item() == pytest.approx(stock.item(), rel=1e-5)


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


def test_mixed_batch_adapter_names_take_peft_path():
    model = tiny_qlora().eval()  # peft serves adapter_names in inference only
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 512, (2, 8))
    names = ["default", "other"]
    with torch.no_grad():
        stock = model(input_ids=ids, adapter_names=names).logits
        patch_model(model, rms_norm=False)  # the norm kernel sums rows in another order: not bit-equal
        assert torch.equal(model(input_ids=ids, adapter_names=names).logits, stock)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"])
def test_rope_option_keeps_loss_and_grads(shape):
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 16))
    assert patched_keeps_loss_and_grads(model, ids, rope=True).rope


@pytest.mark.parametrize("shape,norms", [("tiny-llama", 5), ("tiny-qwen2", 5), ("tiny-mistral", 5),
                                         ("tiny-qwen3", 9)])  # 2 layers x 2 + the final norm; Qwen3's q/k norms
def test_rms_norm_option_keeps_loss_and_grads(shape, norms):
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 16))
    report = patched_keeps_loss_and_grads(model, ids, rms_norm=True)
    assert report.rms_norms == norms and f"{norms} RMSNorms" in report.summary()
    unpatch_model(model)
    assert not any("forward" in vars(m) for m in model.modules())


def _checkpointed_bf16_qlora(shape):
    model = tiny_qlora(shape, dtype=torch.bfloat16).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    return model


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("offload_checkpoints", [True, False])
def test_add_norm_layers_give_the_same_bf16_loss_and_grads_bit_for_bit(shape, offload_checkpoints):
    model = _checkpointed_bf16_qlora(shape)
    ids = torch.randint(0, 512, (2, 24))
    assert patch_model(model, add_norm=False, offload_checkpoints=offload_checkpoints).add_norms == 0
    separate_loss, separate_grads = loss_and_grads(model, ids)
    unpatch_model(model)
    report = patch_model(model, offload_checkpoints=offload_checkpoints)
    assert report.add_norms == 2 and "2 decoder layers' with the residual add" in report.summary()
    loss, grads = loss_and_grads(model, ids)
    assert loss == separate_loss and grads.keys() == separate_grads.keys()
    assert all(torch.equal(grads[n], separate_grads[n]) for n in grads)
    unpatch_model(model)
    assert not any("forward" in vars(m) or vars(m).get(core.OUTPUT_UNREAD_IN_RECOMPUTE)
                   for m in model.modules())


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


def test_recompute_leaves_the_layer_output_uncomputed(monkeypatch):
    model = _checkpointed_bf16_qlora("tiny-llama")
    patch_model(model, offload_checkpoints=True)
    sums = []
    monkeypatch.setattr(norms, "unread_sum", lambda a, b: sums.append(a.shape) or unread_sum(a, b))
    loss_and_grads(model, torch.randint(0, 512, (2, 24)))
    assert sums == [(2, 24, 64)] * 2  # each layer's recompute; its first pass adds


def test_add_norm_needs_the_norm_kernel_and_hook_free_norms():
    model = tiny_qlora()
    assert patch_model(model, rms_norm=False).add_norms == 0
    unpatch_model(model)
    model.base_model.model.model.layers[0].input_layernorm.register_forward_hook(lambda *args: None)
    assert patch_model(model).add_norms == 1


def test_gemma_norms_are_left_alone():
    assert patch_model(tiny_qlora("tiny-gemma"), rms_norm=True).rms_norms == 0


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


def test_rotary_embeddings_are_routed_and_restored():
    import transformers.models.llama.modeling_llama as modeling

    stock = modeling.apply_rotary_pos_emb
    model = tiny_qlora().train()
    report = patch_model(model)  # on by default
    assert report.rope and "rotary embeddings" in report.summary()
    assert modeling.apply_rotary_pos_emb.qlora_fast_stock is stock
    calls = []
    original = RoPEFunction.apply
    RoPEFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        loss_and_grads(model, torch.randint(0, 512, (1, 8)))
    finally:
        RoPEFunction.apply = original
    assert len(calls) == 2  # one per decoder layer
    unpatch_model(model)
    assert modeling.apply_rotary_pos_emb is stock
    assert patch_model(model, rope=False).rope is False and modeling.apply_rotary_pos_emb is stock


def _qkv_grad_fns(model, ids, projections=("k_proj", "v_proj")):
    """The grad_fn names of every output of these projections in one forward."""
    names, handles = [], []
    for name, module in model.named_modules():
        if name.endswith(projections):
            handles.append(module.register_forward_hook(lambda m, i, out: names.append(type(out.grad_fn).__name__)))
    try:
        model(input_ids=ids, labels=ids)
    finally:
        for handle in handles:
            handle.remove()
    return names


# Qwen3 normalizes q and k right after their projections
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma"])
def test_qkv_projections_run_as_one_function(shape):  # Qwen2's q/k/v carry a frozen base bias
    model = tiny_qlora(shape).train()
    ids = torch.randint(0, 512, (2, 24))
    assert patched_keeps_loss_and_grads(model, ids).qkv == 2
    assert not any("_qlora_fast_stashed_output" in vars(m) for m in model.modules())  # every k, v taken
    assert set(_qkv_grad_fns(model, ids, ("q_proj",))) == {"LoRANF4QKVFunctionBackward"}
    # with a hook on k_proj / v_proj (which would then see their call, not the fused one) each goes alone
    assert set(_qkv_grad_fns(model, ids)) == {"LoRANF4LinearFunctionBackward"}
    unpatch_model(model)
    assert not any("_qlora_fast_kv_siblings" in vars(m) for m in model.modules())


def test_qkv_with_trainable_base_bias_or_dropout_takes_three_layers():
    model = tiny_qlora("tiny-qwen2")
    model.base_model.model.model.layers[0].self_attn.k_proj.base_layer.bias.requires_grad_(True)
    assert patch_model(model).qkv == 1
    model = tiny_qlora(lora_dropout=0.1).train()
    patch_model(model)
    ids = torch.randint(0, 512, (1, 16))
    assert set(_qkv_grad_fns(model, ids)) == {"LoRANF4LinearFunctionBackward"}
    assert not any("_qlora_fast_stashed_output" in vars(m) for m in model.modules())


def test_norms_unfrozen_after_patching_get_their_gradient():
    model = tiny_qlora().train()
    patch_model(model, verbose=False)
    norm = model.base_model.model.model.layers[0].input_layernorm
    norm.weight.requires_grad_(True)
    ids = torch.randint(0, 512, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_add_norm_only_on_the_transformers_it_reproduces(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")  # decoder layers of another signature
    report = patch_model(tiny_qlora(), verbose=False)
    assert report.add_norms == 0 and report.rms_norms == 5


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

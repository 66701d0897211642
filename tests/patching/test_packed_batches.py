"""patching/packed_attention.py: a padding-free packed batch through a patched model computes what stock
transformers computes with its dense block-causal mask, and what each sequence computes alone."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.patch import CALLS
from tests import helpers
from tests.helpers import assert_same_loss_and_grads, tiny_qlora

LENGTHS = (5, 9, 7, 11)


def packed_batch(lengths=LENGTHS, vocab=512):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (1, sum(lengths)))
    return ids, torch.cat([torch.arange(n) for n in lengths])[None]


def loss_and_grads(model, ids, position_ids, **kwargs):
    """One training step's loss and LoRA gradients, without a KV cache, as TRL calls the model (with a cache,
    transformers itself does not separate the sequences)."""
    kwargs.setdefault("use_cache", False)
    return helpers.loss_and_grads(model, ids, position_ids=position_ids, **kwargs)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3", "tiny-phi3"])
def test_packed_batch_matches_stock_dense_mask(shape):
    model = tiny_qlora(shape).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, position_ids = packed_batch()
    stock = loss_and_grads(model, ids, position_ids)
    report = patch_model(model)
    assert report.packed_attention == 1 and "packed batches" in report.summary()
    CALLS.clear()
    assert_same_loss_and_grads(stock, loss_and_grads(model, ids, position_ids))
    # forward and the checkpoint's recompute, per layer
    assert CALLS["packed_attention"] == 2 * model.config.num_hidden_layers


def test_fp32_attention_inputs_under_autocast(monkeypatch):
    """A prepared model (fp32 norms) under autocast hands attention fp32 q/k/v; SDPA computes them in bf16
    under autocast, and so must the packed path (the GPU kernels take only 16-bit inputs)."""
    from peft import prepare_model_for_kbit_training

    import qlora_fast.ops.packed_attention as op
    from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm

    seen = []
    backend = op.backend
    monkeypatch.setattr(op, "backend", lambda q: seen.append(q.dtype) or backend(q))

    model = quantize_to_nf4_(random_causal_lm("tiny-llama", torch.bfloat16), compute_dtype=torch.bfloat16)
    model = add_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), init_b_std=0.02)
    ids, position_ids = packed_batch()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(model, ids, position_ids)

    stock = step()
    patch_model(model, verbose=False)
    CALLS.clear()
    patched = step()
    assert CALLS["packed_attention"] == model.config.num_hidden_layers
    assert set(seen) == {torch.bfloat16}
    assert patched[0] == pytest.approx(stock[0], rel=2e-3)
    for name in stock[1]:
        cosine = torch.nn.functional.cosine_similarity(patched[1][name].flatten(), stock[1][name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_each_sequence_as_if_alone():
    model = tiny_qlora().eval()
    patch_model(model)
    ids, position_ids = packed_batch()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        start = 0
        for n in LENGTHS:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits
            torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_the_comparison_catches_attention_across_sequences(monkeypatch):
    """Mutant: the hook finds the sequences with one boundary dropped; the step no longer matches stock."""
    import qlora_fast.patching.packed_attention as patching
    from qlora_fast.ops.packed_attention import PackedSequences, find_packed_sequences

    def one_boundary_dropped(position_ids, batch_size):
        found = find_packed_sequences(position_ids, batch_size)
        cu = torch.cat([found.cu_seqlens[:1], found.cu_seqlens[2:]])
        return PackedSequences(cu, int(cu.diff().max()))

    model = tiny_qlora().train()
    ids, position_ids = packed_batch()
    stock = loss_and_grads(model, ids, position_ids)
    patch_model(model)
    monkeypatch.setattr(patching, "find_packed_sequences", one_boundary_dropped)
    with pytest.raises(AssertionError):
        assert_same_loss_and_grads(stock, loss_and_grads(model, ids, position_ids))


def test_sequence_bounds_passed_by_the_caller():
    model = tiny_qlora().train()
    ids, position_ids = packed_batch()
    stock = loss_and_grads(model, ids, position_ids)
    patch_model(model)
    cu = torch.tensor([0, 5, 14, 21, 32], dtype=torch.int32)
    CALLS.clear()
    patched = loss_and_grads(model, ids, position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11,
                             max_length_k=11)
    assert_same_loss_and_grads(stock, patched)
    assert CALLS["packed_attention"] == model.config.num_hidden_layers


@pytest.mark.parametrize("case", ["unpacked", "attention mask", "cache", "longer than the sliding window"])
def test_other_batches_keep_the_stock_path(case):
    shape = "tiny-mistral" if case == "longer than the sliding window" else "tiny-llama"
    model = tiny_qlora(shape).train()
    ids, position_ids = packed_batch()
    kwargs = {}
    if case == "unpacked":
        position_ids = torch.arange(ids.shape[1])[None]
    elif case == "attention mask":
        kwargs["attention_mask"] = torch.ones_like(ids)
    elif case == "cache":
        kwargs["use_cache"] = True
    else:
        model.config.sliding_window = 8  # shorter than two of the sequences
    stock = loss_and_grads(model, ids, position_ids, **kwargs)
    patch_model(model)
    CALLS.clear()
    assert_same_loss_and_grads(stock, loss_and_grads(model, ids, position_ids, **kwargs))
    assert CALLS["packed_attention"] == 0


def test_a_stack_that_drops_keyword_arguments_is_not_served():
    """Remote code whose decoder stack takes no **kwargs would never hand attention the sequences."""
    model = tiny_qlora().train()
    stack = model.base_model.model.model
    stock_forward = stack.forward
    stack.forward = lambda input_ids=None, attention_mask=None, position_ids=None, use_cache=None: stock_forward(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
    assert patch_model(model).packed_attention == 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_softcapped_attention_is_not_served_and_the_summary_says_why(implementation):
    model = tiny_qlora("tiny-gemma2").train()
    model.config._attn_implementation = implementation
    report = patch_model(model)
    assert report.packed_attention == 0 and model.config._attn_implementation == implementation
    assert "packed batches keep the dense attention mask (softcapped attention scores)" in report.summary()


def test_eager_attention_is_not_served_and_the_summary_says_how_to_change_it():
    model = tiny_qlora().train()
    model.config._attn_implementation = "eager"
    report = patch_model(model)
    assert report.packed_attention == 0 and "load with attn_implementation='sdpa'" in report.summary()
    unpatch_model(model)
    model.config._attn_implementation = "sdpa"
    assert "dense attention mask" not in patch_model(model).summary()


def test_switch_off_and_restore():
    model = tiny_qlora().train()
    assert patch_model(model, packed_attention=False, keep_attention_outputs=False).packed_attention == 0
    assert model.config._attn_implementation == "sdpa"  # (kept outputs switch it too: tests/patching/test_kept_outputs.py)
    unpatch_model(model)
    assert patch_model(model).packed_attention == 1
    assert patch_model(model).packed_attention == 1  # idempotent
    assert model.config._attn_implementation == "qlora_fast_sdpa"
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_gpu_without_a_varlen_kernel_keeps_the_mask_and_says_so(monkeypatch):
    from qlora_fast.patching import packed_attention as patching_module

    monkeypatch.setattr(patching_module, "worth_it_on", lambda device: False)
    report = patch_model(tiny_qlora().train())
    assert report.packed_attention == 0 and "no varlen attention kernel on this GPU" in report.summary()

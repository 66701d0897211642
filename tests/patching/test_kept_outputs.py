"""patching/kept_outputs.py and patching/attention.py: with keep_attention_outputs (the default), unmasked causal
attention inside an offloaded checkpoint keeps its output for the recompute; the step is the same, the switch
and unpatch_model take it away, and the packed-attention switch stays independent of it."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from qlora_fast.patch import CALLS
from qlora_fast.patching.attention import IMPLEMENTATION, KEEPS, PACKS
from tests.helpers import assert_same_loss_and_grads, loss_and_grads, tiny_qlora


def checkpointed(shape="tiny-llama"):
    model = tiny_qlora(shape).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def marked(model, mark) -> int:
    return sum(bool(vars(m).get(mark)) for m in model.modules())


def counted_cpu_flash_forwards(monkeypatch) -> list:
    """The CPU flash kernel's forwards that kept attention runs, one entry each."""
    import qlora_fast.ops.kept_attention as kept_ops

    forwards, cpu_flash = [], ("cpu", int(torch.nn.attention.SDPBackend.FLASH_ATTENTION))
    kernel = kept_ops._KERNELS[cpu_flash]
    monkeypatch.setitem(kept_ops._KERNELS, cpu_flash, kept_ops._FusedKernel(
        lambda *args: forwards.append(1) or kernel.forward(*args), kernel.backward))
    return forwards


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_kept_attention_output_gives_the_same_step(shape, monkeypatch):
    """Same loss and gradients, bit for bit, as the patched model that recomputes its attention (same CPU
    kernel), with the attention's forward run once a layer instead of twice."""
    model = checkpointed(shape)
    ids = torch.randint(0, 512, (2, 24))
    assert patch_model(model, keep_attention_outputs=False).kept_attention == 0
    recomputed = loss_and_grads(model, ids, use_cache=False)
    unpatch_model(model)
    report = patch_model(model)
    assert report.kept_attention == 1 and "the attention's outputs: not recomputed" in report.summary()
    forwards = counted_cpu_flash_forwards(monkeypatch)
    CALLS.clear()
    kept = loss_and_grads(model, ids, use_cache=False)
    layers = model.config.num_hidden_layers
    assert CALLS["kept_attention"] == 2 * layers and len(forwards) == layers
    assert kept[0] == recomputed[0]
    assert all(torch.equal(kept[1][n], recomputed[1][n]) for n in recomputed[1])


@pytest.mark.parametrize("packed", [True, False])
def test_switched_off_nothing_is_kept(packed):
    """With packed attention the stack still runs our implementation, but its attentions are not marked to keep."""
    model = checkpointed()
    report = patch_model(model, keep_attention_outputs=False, packed_attention=packed)
    assert report.kept_attention == 0 and marked(model, KEEPS) == 0
    assert model.config._attn_implementation == (IMPLEMENTATION if packed else "sdpa")
    CALLS.clear()
    loss_and_grads(model, torch.randint(0, 512, (2, 24)), use_cache=False)
    assert CALLS["kept_attention"] == 0


def test_kept_without_packed_attention_a_packed_batch_takes_the_dense_mask():
    """packed_attention=False: a packed batch is attended through transformers' block-causal mask as stock
    does, while unmasked batches still keep their attention's output."""
    model = checkpointed()
    lengths = (5, 9, 7)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    stock = loss_and_grads(model, ids, position_ids=positions, use_cache=False)
    report = patch_model(model, packed_attention=False)
    assert report.packed_attention == 0 and report.kept_attention == 1
    assert model.config._attn_implementation == IMPLEMENTATION and marked(model, PACKS) == 0
    CALLS.clear()
    assert_same_loss_and_grads(stock, loss_and_grads(model, ids, position_ids=positions, use_cache=False))
    assert CALLS["packed_attention"] == 0 and CALLS["kept_attention"] == 0  # the block-causal mask is a mask
    loss_and_grads(model, ids, use_cache=False)
    assert CALLS["kept_attention"] > 0


def test_outside_a_checkpoint_the_attention_is_stock_sdpa():
    """Evaluation and generation (no checkpoint, nothing to keep for) call transformers' own sdpa function."""
    model = checkpointed()
    patch_model(model)
    CALLS.clear()
    with torch.no_grad():
        model.eval()(input_ids=torch.randint(0, 512, (2, 24)), use_cache=False)
        model.generate(torch.randint(0, 512, (1, 6)), max_new_tokens=3, do_sample=False)
    assert CALLS["kept_attention"] == 0


def test_unpatch_gives_the_attention_back():
    model = checkpointed()
    patch_model(model)
    assert patch_model(model).kept_attention == 1  # idempotent
    assert marked(model, KEEPS) == model.config.num_hidden_layers
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert marked(model, KEEPS) == marked(model, PACKS) == 0


def test_softcapped_attention_is_not_kept():
    """Gemma-2's softcapped scores are not what kept attention computes: its stacks keep sdpa."""
    model = checkpointed("tiny-gemma2")
    assert patch_model(model, verbose=False).kept_attention == 0
    assert marked(model, KEEPS) == 0


@pytest.mark.parametrize("shape, keeps", [("llama-3-8b", True), ("qwen2.5-7b", True), ("gemma-2-9b", True),
                                          ("phi-3.5-mini", False)])
def test_projection_products_are_kept_where_the_layer_hides_their_copies(shape, keeps):
    """Real shapes (on the meta device): Llama-3-8B keeps its projections' products (5,916 multiply-adds per
    copied byte, timed faster kept) and Phi-3.5-mini does not (3,072, timed slower kept)."""
    from qlora_fast.harness.models import random_causal_lm
    from qlora_fast.patching.kept_outputs import MIN_MACS_PER_COPIED_BYTE, macs_per_copied_byte

    layer = random_causal_lm(shape, device="meta").model.layers[0]
    assert (macs_per_copied_byte(layer) >= MIN_MACS_PER_COPIED_BYTE) == keeps


@pytest.mark.parametrize("shape, macs, elements", [
    # q 128 + k, v 64 each, o 128 -> 64, gate/up 64 -> 192, down 192 -> 64
    ("tiny-llama", 64 * (128 + 64 + 64) + 128 * 64 + 3 * 64 * 192, 2 * 64 + 128 + (128 + 64 + 64)),
    # qkv 192 -> 384 (q 192, k and v 96 each), o 192 -> 192, gate_up 192 -> 512, down 256 -> 192
    ("tiny-phi3", 192 * (384 + 192 + 512) + 256 * 192, 2 * 192 + 192 + 384)])
def test_macs_per_copied_byte_counts_base_layers_not_adapters(shape, macs, elements):
    """Counted by hand: the layer's linear layers' products a token over two bytes for each of the input, q/k/v
    (or qkv), o's output and the attention's output; the same with NF4 base layers and LoRA adapters."""
    from qlora_fast.harness.models import random_causal_lm
    from qlora_fast.patching.kept_outputs import macs_per_copied_byte

    assert macs_per_copied_byte(random_causal_lm(shape).model.layers[0]) == macs / (2 * elements)
    assert macs_per_copied_byte(tiny_qlora(shape).base_model.model.model.layers[0]) == macs / (2 * elements)

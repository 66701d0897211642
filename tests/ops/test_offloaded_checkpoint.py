"""Offloaded checkpointing gives torch's checkpoint gradients (the host round trip itself runs on the GPU
only: bench/train_step.py's offload variant checks loss parity there)."""

import functools
from collections import Counter

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qlora_fast import patch_model, unpatch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.ops.offloaded_checkpoint import OffloadedCheckpointFunction, keep_outcomes, offloaded_checkpoint
from tests.helpers import rel_err


class Block(torch.nn.Module):
    """A layer with dropout (the recompute must draw the same mask) and a second tensor argument."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.dropout = torch.nn.Dropout(0.3)

    def forward(self, x, bias, scale=2.0):
        return self.dropout(torch.tanh(self.linear(x) + bias)) * scale


def grads_through(checkpoint_fn, block, x, bias):
    x = x.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    h = x
    for _ in range(3):  # a chain, as decoder layers are
        h = checkpoint_fn(functools.partial(block, scale=0.5), h, bias)
    h.pow(2).sum().backward()
    return h.detach(), x.grad, bias.grad, block.linear.weight.grad


def test_matches_torch_checkpoint_with_dropout_and_tensor_args():
    block = Block().train()
    x, bias = torch.randn(4, 16), torch.randn(16)
    reference = grads_through(functools.partial(checkpoint, use_reentrant=False), block, x, bias)
    ours = grads_through(offloaded_checkpoint, block, x, bias)
    for r, o in zip(reference, ours):
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_recompute_keeps_autocast():
    block = Block().eval()
    x, bias = torch.randn(4, 16), torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = grads_through(functools.partial(checkpoint, use_reentrant=False), block, x, bias)
        ours = grads_through(offloaded_checkpoint, block, x, bias)
    without_autocast = grads_through(offloaded_checkpoint, block, x, bias)
    assert not torch.equal(ours[3], without_autocast[3])  # bf16 matmuls in the recompute too
    for r, o in zip(reference[:3], ours[:3]):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    # torch sums the three layers' weight gradients on autocast's one cached bf16 copy of the weight;
    # each recompute here casts its own, so the sum is taken in fp32: equal up to bf16 rounding.
    assert rel_err(ours[3], reference[3]) < 1e-2


def test_input_without_grad_takes_torch_checkpoint():
    calls = []
    original = OffloadedCheckpointFunction.apply
    OffloadedCheckpointFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        block = Block()
        out = offloaded_checkpoint(block, torch.randn(2, 16), torch.zeros(16))
        out.sum().backward()  # gradients still reach the block's parameters
    finally:
        OffloadedCheckpointFunction.apply = original
    assert not calls and block.linear.weight.grad is not None


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("enable_checkpointing_after_patch", [False, True])
def test_patch_model_offloads_the_decoder_layers(enable_checkpointing_after_patch):
    model = add_lora(quantize_to_nf4_(random_causal_lm("tiny-llama", torch.float32), torch.float32),
                     init_b_std=0.02).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 512, (2, 16))
    stock_loss, stock_grads = loss_and_grads(model, ids)
    if enable_checkpointing_after_patch:  # as Trainer does, after the user's script patched the model
        model.gradient_checkpointing_disable()
    report = patch_model(model, offload_checkpoints=True)
    if enable_checkpointing_after_patch:
        model.gradient_checkpointing_enable()
    assert report.offloaded_checkpoints and "offloaded to the host" in report.summary()
    layers = model.base_model.model.model.layers
    assert all(layer._gradient_checkpointing_func is offloaded_checkpoint for layer in layers)

    loss, grads = loss_and_grads(model, ids)
    assert loss == pytest.approx(stock_loss, rel=1e-5)
    assert grads.keys() == stock_grads.keys()
    assert all(rel_err(grads[n], stock_grads[n]) < 1e-4 for n in grads)

    unpatch_model(model)
    assert all(layer._gradient_checkpointing_func is not offloaded_checkpoint for layer in layers)
    assert loss_and_grads(model, ids)[0] == pytest.approx(stock_loss, rel=1e-6)


def spy_output_needed(monkeypatch) -> list:
    """Records each fused MLP call's output_needed."""
    import qlora_fast.patching.mlp as mlp_patch

    calls, fused = [], mlp_patch.lora_nf4_mlp
    monkeypatch.setattr(mlp_patch, "lora_nf4_mlp", lambda *a, **kw: calls.append(kw["output_needed"])
                        or fused(*a, **kw))
    return calls


@pytest.mark.parametrize("shape,skips", [("tiny-llama", True), ("tiny-gemma", True), ("tiny-phi3", True),
                                          ("tiny-gemma2", False)])  # Gemma 2's norm after the MLP reads it
def test_recompute_skips_the_mlp_output_and_keeps_every_gradient(monkeypatch, shape, skips):
    import qlora_fast.patching.core as core

    model, _ = patched_tiny(torch.float32, shape)
    layers = model.base_model.model.model.layers
    for layer in layers:
        if hasattr(layer, "resid_mlp_dropout"):  # Phi-3's dropout on the MLP output: its mask, not the output
            layer.resid_mlp_dropout.p = 0.1
    calls = spy_output_needed(monkeypatch)
    ids = torch.randint(0, 512, (2, 16))
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, ids)
    assert calls == [True] * len(layers) + [not skips] * len(layers)  # forward, then each recompute

    calls.clear()
    for layer in layers:
        vars(layer.mlp).pop(core.OUTPUT_ONLY_TO_RESIDUAL, None)
    torch.manual_seed(1)
    full_loss, full_grads = loss_and_grads(model, ids)
    assert calls == [True] * (2 * len(layers))
    assert full_loss == loss
    assert all(torch.equal(grads[n], full_grads[n]) for n in grads)


def test_a_hook_on_the_mlp_keeps_its_output_in_the_recompute(monkeypatch):
    model, _ = patched_tiny(torch.float32)
    layers = model.base_model.model.model.layers
    seen = []
    layers[0].mlp.register_forward_hook(lambda module, args, output: seen.append(output.abs().max().item()))
    calls = spy_output_needed(monkeypatch)
    loss_and_grads(model, torch.randint(0, 512, (2, 16)))
    assert calls == [True] * len(layers) + [False, True]  # recomputes run last layer first; the hooked one is whole
    assert len(seen) == 2 and seen[0] == seen[1]


def patched_tiny(dtype, shape="tiny-llama", **options):
    model = add_lora(quantize_to_nf4_(random_causal_lm(shape, dtype), dtype), init_b_std=0.02).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    report = patch_model(model, offload_checkpoints=True, verbose=False, **options)
    return model, report


def count_attention_gemms(monkeypatch):
    """op -> calls during recomputes of the attention projections' base products: the stacked q/k/v
    dequantize and the linear forward (o_proj; the MLP has its own Function)."""
    import qlora_fast.ops.lora_nf4_linear as linear_op
    import qlora_fast.ops.lora_nf4_qkv as qkv_op
    from qlora_fast.ops.offloaded_checkpoint import recomputing

    calls = Counter()

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += recomputing()
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counted(qkv_op, "nf4_dequantize_stacked")
    counted(linear_op, "nf4_linear_forward")
    return calls


@pytest.mark.parametrize("shape, dtype", [("tiny-llama", torch.float32), ("tiny-llama", torch.bfloat16),
                                          ("tiny-qwen2", torch.float32), ("tiny-gemma2", torch.float32),
                                          ("tiny-phi3", torch.float32)])
def test_recompute_takes_the_kept_attention_outputs(monkeypatch, shape, dtype):
    """q/k/v (stacked, Qwen2's with its bias; Phi-3's qkv_proj one layer) and o come back from the first pass:
    no base product in the recompute, and bit for bit the gradients of recomputing them."""
    model, report = patched_tiny(dtype, shape)
    assert report.kept_outputs and "the attention projections'" in report.summary()
    calls = count_attention_gemms(monkeypatch)
    ids = torch.randint(0, 512, (2, 16))
    keep_outcomes(reset=True)
    loss, grads = loss_and_grads(model, ids)
    assert calls["nf4_dequantize_stacked"] == calls["nf4_linear_forward"] == 0
    layers = len(model.base_model.model.model.layers)
    kept_per_layer = 3 if report.kept_attention else 2  # q/k/v (or qkv), o, and the attention's unless softcapped
    assert keep_outcomes(reset=True) == {"kept": kept_per_layer * layers}

    unpatch_model(model)
    patch_model(model, offload_checkpoints=True, verbose=False, keep_attention_outputs=False)
    calls.clear()
    recomputed_loss, recomputed_grads = loss_and_grads(model, ids)
    assert calls["nf4_dequantize_stacked"] + calls["nf4_linear_forward"] >= 2 * layers
    assert recomputed_loss == loss
    assert all(torch.equal(grads[n], recomputed_grads[n]) for n in grads)


def test_kept_outputs_are_what_the_backward_uses(monkeypatch):
    """A kept tensor altered on its way back changes the gradients: the comparison above can fail."""
    from qlora_fast.ops import offloaded_checkpoint as offload

    model, _ = patched_tiny(torch.float32)
    ids = torch.randint(0, 512, (2, 16))
    loss, grads = loss_and_grads(model, ids)
    fetch = offload._LayerRecord.fetch_kept
    monkeypatch.setattr(offload._LayerRecord, "fetch_kept",
                        lambda self: {k: [tuple(t * 1.5 for t in items) for items in kept]
                                      for k, kept in fetch(self).items()})
    _, altered = loss_and_grads(model, ids)
    assert any(not torch.equal(grads[n], altered[n]) for n in grads)


def test_nothing_is_kept_beyond_the_host_budget(monkeypatch):
    from qlora_fast.ops import offloaded_checkpoint as offload

    monkeypatch.setattr(offload, "_kept_bytes_budget", lambda: 0)
    model, _ = patched_tiny(torch.float32)
    calls = count_attention_gemms(monkeypatch)
    keep_outcomes(reset=True)
    loss_and_grads(model, torch.randint(0, 512, (2, 16)))
    layers = len(model.base_model.model.model.layers)
    assert calls["nf4_dequantize_stacked"] == layers
    assert keep_outcomes(reset=True) == {"host budget": 3 * layers}  # q/k/v, o and the attention's output
    assert offload._kept_host_bytes == 0


def test_keeping_outside_a_checkpoint_does_nothing():
    from qlora_fast.ops.offloaded_checkpoint import keep_for_recompute, kept_for_recompute

    key = object()
    keep_for_recompute(key, torch.ones(3))
    assert kept_for_recompute(key) is None


def test_the_host_budget_is_a_quarter_of_available_memory():
    from qlora_fast.ops.offloaded_checkpoint import _kept_bytes_budget

    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert 0.2 * available < _kept_bytes_budget() < 0.3 * available  # read once; memory moves a little


@pytest.mark.parametrize("fused_head", [False, True], ids=["chunked loss", "TRL's fused-head call"])
def test_the_loss_starts_bringing_back_the_last_layer(fused_head, monkeypatch):
    """The backward's first need, the last layer's input and kept tensors, is asked back as the loss is
    computed, before the backward: once, for the last layer's record (later layers fetch while the one
    after them computes, as before)."""
    from qlora_fast.ops import offloaded_checkpoint as offload
    from qlora_fast.patching.core import CALLS

    CALLS.clear()
    model, _ = patched_tiny(torch.float32)
    asked = []
    prefetch = offload._LayerRecord.prefetch
    monkeypatch.setattr(offload._LayerRecord, "prefetch", lambda self: asked.append(self) or prefetch(self))
    ids = torch.randint(0, 512, (2, 16))
    if fused_head:  # a trainer built after patch_model installs TRL's head; its calls are answered by ours
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        assert CALLS["trl_head"]
    else:
        loss = model(input_ids=ids, labels=ids).loss
    assert len(asked) == 1 and asked[0] is offload._last_forward_record()
    loss.backward()
    layers = len(model.base_model.model.model.layers)
    assert len(asked) == layers  # then each earlier layer's, during the backward of the one after it


class _Read:
    """A stand-in for the CUDA event after a buffer's last read."""

    def __init__(self, done: bool):
        self.done = done

    def query(self) -> bool:
        return self.done


def test_pinned_buffers_serve_a_shorter_step_from_the_longer_steps_buffers():
    """A packed step shorter than the last (151 -> 133 MB, in bytes here 300 -> 200) reuses its buffers,
    though torch's pinned allocator would round 200 to another power of two (256) and pin anew."""
    from qlora_fast.ops.offloaded_checkpoint import PinnedBuffers

    pool = PinnedBuffers(allocate=lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    first = pool.take(300)
    assert first.numel() == 512 and pool.allocated == 1
    pool.give_back(first, _Read(True))
    again = pool.take(200)
    assert again.data_ptr() == first.data_ptr() and pool.allocated == 1


def test_pinned_buffers_wait_for_the_last_read_and_fit_best():
    from qlora_fast.ops.offloaded_checkpoint import PinnedBuffers

    pool = PinnedBuffers(allocate=lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    large, small, busy = pool.take(1000), pool.take(100), pool.take(100)
    pool.give_back(large)
    pool.give_back(small, _Read(True))
    pool.give_back(busy, _Read(False))  # its copy back to the GPU still running: not reused
    assert pool.take(90).data_ptr() == small.data_ptr()  # the smallest that holds it
    assert pool.take(90).data_ptr() == large.data_ptr()
    assert pool.take(90).data_ptr() not in {b.data_ptr() for b in (large, small, busy)} and pool.allocated == 4
    assert pool.take(0).numel() == 1


def test_a_layer_computing_too_little_keeps_the_attention_and_recomputes_the_projections(monkeypatch):
    """Where a layer computes too little per copied byte (patching/kept_outputs.py; a tiny model, copied to a
    host as on a GPU): one kept tuple a layer (the attention's output and logsumexp), the projections' base
    products computed again in the recompute, gradients bit for bit those of keeping them."""
    from qlora_fast.patching import kept_outputs

    model, _ = patched_tiny(torch.float32)
    ids = torch.randint(0, 512, (2, 16))
    loss, grads = loss_and_grads(model, ids)
    unpatch_model(model)
    monkeypatch.setattr(kept_outputs, "_copies_to_host", lambda layer: True)
    report = patch_model(model, offload_checkpoints=True, verbose=False)
    assert report.kept_outputs == 0 and report.kept_attention
    calls = count_attention_gemms(monkeypatch)
    keep_outcomes(reset=True)
    only_attention_loss, only_attention_grads = loss_and_grads(model, ids)
    layers = len(model.base_model.model.model.layers)
    assert keep_outcomes(reset=True) == {"kept": layers}
    assert calls["nf4_dequantize_stacked"] == calls["nf4_linear_forward"] == layers  # q/k/v stacked, and o
    assert only_attention_loss == loss and all(torch.equal(grads[n], only_attention_grads[n]) for n in grads)

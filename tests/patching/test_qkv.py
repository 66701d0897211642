"""patching/qkv.py: an attention's q, k and v projections as one Function."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from tests.helpers import patched_keeps_loss_and_grads, tiny_qlora


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


def test_qwen2_qkv_bias_is_patched():
    model = tiny_qlora("tiny-qwen2")
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    assert patch_model(model).patched == 14


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


@pytest.fixture
def phi3_256_wide(monkeypatch):
    """tiny-phi3 256 wide, so that q's, k's and v's rows in qkv_proj start on blocks of absmax codes (as
    Phi-3's do; tiny-phi3's 48-wide heads do not); the qkv patching module, for mutants."""
    import qlora_fast.patching.qkv as qkv
    from qlora_fast.harness.models import MODEL_SHAPES

    family, config = MODEL_SHAPES["tiny-phi3"]
    monkeypatch.setitem(MODEL_SHAPES, "tiny-phi3", (family, {**config, "hidden_size": 256}))
    return qkv


def _swapped_k_and_v(qkv, monkeypatch):
    """The mutant: qkv_proj's k and v row blocks exchanged."""
    blocks = qkv.row_blocks
    monkeypatch.setattr(qkv, "row_blocks", lambda *args: (lambda b: [b[0], b[2], b[1]])(blocks(*args)))


def test_phi3_qkv_proj_as_q_k_and_v_blocks(phi3_256_wide, monkeypatch):
    """fp32 and bf16 loss and gradients as stock's, packed rows too; its q, k and v come from the fused
    Function; swapping k's and v's blocks (the mutant) must show."""
    from qlora_fast.patch import CALLS
    from tests.helpers import loss_and_grads, rel_err

    ids = torch.randint(0, 512, (2, 24))
    model = tiny_qlora("tiny-phi3").train()
    assert patched_keeps_loss_and_grads(model, ids, verbose=False).qkv == 2
    CALLS.clear()
    loss_and_grads(model, ids)
    assert CALLS["qkv"] == 2 and CALLS["linear"] == 2  # o_proj alone
    assert CALLS["rope"] == 2  # q and k rotated inside the Function (64-wide heads)
    unpatch_model(model)
    model = tiny_qlora("tiny-phi3", torch.bfloat16).train()
    stock_loss, stock = loss_and_grads(model, ids)
    patch_model(model, verbose=False)
    loss, grads = loss_and_grads(model, ids)
    assert loss == pytest.approx(stock_loss, rel=1e-2) and max(rel_err(grads[n], stock[n]) for n in stock) < 5e-2
    _swapped_k_and_v(phi3_256_wide, monkeypatch)
    _, swapped = loss_and_grads(model, ids)
    assert max(rel_err(swapped[n], stock[n]) for n in stock) > 0.1


def test_phi3_qkv_proj_off_block_boundaries_keeps_the_stock_forward():
    """Rows that do not start on a block of absmax codes (tiny-phi3's 48-wide heads) cannot dequantize on
    their own: the attention is not patched, and qkv_proj runs as one LoRA layer, computing what stock does."""
    from qlora_fast.patch import CALLS
    from tests.helpers import loss_and_grads

    model = tiny_qlora("tiny-phi3").train()
    ids = torch.randint(0, 512, (2, 24))
    assert patched_keeps_loss_and_grads(model, ids, verbose=False).qkv == 0
    CALLS.clear()
    loss_and_grads(model, ids)
    assert CALLS["qkv"] == 0 and CALLS["linear"] == 4


@pytest.mark.parametrize("mutant", [False, True], ids=["patched", "mutant: k and v blocks swapped"])
def test_phi3_qkv_proj_blocks_on_a_prepared_checkpointed_model(phi3_256_wide, monkeypatch, mutant):
    """peft's recipe (prepared: fp32 norms and residual stream, autocast, checkpointing): v written in
    the dtype attention takes, q and k in stock's fp32 for RoPE; loss and every LoRA gradient as stock's."""
    from tests.test_prepared_model import _autocast_loss_and_grads, prepared_tiny

    model = prepared_tiny("tiny-phi3", b_std=0.02)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 512, (2, 24))
    stock_loss, stock_grads = _autocast_loss_and_grads(model, ids)
    assert patch_model(model, verbose=False).qkv == 2
    if mutant:
        _swapped_k_and_v(phi3_256_wide, monkeypatch)
    loss, grads = _autocast_loss_and_grads(model, ids)
    worst = min(torch.nn.functional.cosine_similarity(grads[n].float().flatten(), stock_grads[n].float().flatten(),
                                                      dim=0).item() for n in grads)
    matches = loss.item() == pytest.approx(stock_loss.item(), rel=2e-3) and worst > 0.999
    assert matches != mutant, (loss.item(), stock_loss.item(), worst)
    unpatch_model(model)
    assert not any("forward" in vars(m) for m in model.base_model.model.model.layers.modules()
                   if type(m).__name__ == "Phi3Attention")


def _activation_sized_slice_backwards(model, ids) -> int:
    """slice_backward calls of a training step whose output has at least one hidden state per token: autograd
    assembling the gradient of a sliced activation from zero-filled copies."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from tests.helpers import loss_and_grads

    least = ids.numel() * model.config.hidden_size
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.slice_backward and out.numel() >= least:
                seen.append(tuple(out.shape))
            return out

    with Spy():
        loss_and_grads(model, ids)
    return len(seen)


@pytest.mark.parametrize("fused", [False, True], ids=["stock qkv_proj slices", "fused q/k/v"])
def test_phi3_qkv_proj_blocks_leave_no_zero_filled_qkv_gradients(phi3_256_wide, fused):
    """What the row blocks are for: stock slices one qkv output three times, so backward builds three
    zero-filled (tokens x 3 hidden) gradients and adds them; the fused Function writes one."""
    model = tiny_qlora("tiny-phi3", torch.bfloat16).train()
    patch_model(model, fused_qkv=fused, verbose=False)
    slices = _activation_sized_slice_backwards(model, torch.randint(0, 512, (2, 24)))
    layers = model.config.num_hidden_layers
    assert slices == (0 if fused else 3 * layers)

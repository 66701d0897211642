"""patching/architectures.py: the table's rows beyond the Llama family, and detection by structure."""

import pytest
import torch

from tests.helpers import patched_keeps_loss_and_grads, tiny_qlora


# Rows of the architecture table beyond the Llama family: Gemma-2/3 (q/k/v and GeGLU MLPs fused, the
# loss chunked, softcapped inside the kernel for Gemma-2), Phi-3 (fused qkv_proj served as one LoRA layer,
# gate_up_proj's halves as a fused SwiGLU MLP; Llama's layer with residual dropouts, RoPE of 48-wide heads)
@pytest.mark.parametrize("shape, patched, fused", [("tiny-gemma2", 14, {"qkv": 2, "mlps": 2, "chunked_loss": True}),
                                                   ("tiny-gemma3", 14, {"qkv": 2, "mlps": 2, "chunked_loss": True}),
                                                   ("tiny-phi3", 8, {"qkv": 0, "mlps": 2, "rms_norms": 5,
                                                                   "add_norms": 2, "rope": True,
                                                                   "chunked_loss": True})])
def test_more_families_keep_loss_and_grads(shape, patched, fused):
    model = tiny_qlora(shape).train()
    report = patched_keeps_loss_and_grads(model, torch.randint(0, 512, (2, 24)), verbose=False)
    assert report.patched == patched and not report.skipped
    assert {k: getattr(report, k) for k in fused} == fused
    assert report.stock_loss == (None if fused["chunked_loss"] else type(model.base_model.model).__name__)


def test_renamed_copies_of_llama_classes_get_the_fused_paths():
    """A model whose classes carry other names (remote code, a fork) but Llama's forwards: detected by
    structure, every fused path taken, and the same loss and gradients."""
    model = tiny_qlora().train()
    renamed = {}
    for m in model.modules():
        cls = type(m)
        if cls.__module__.startswith("transformers.models.llama"):
            renamed.setdefault(cls, type("My" + cls.__name__.removeprefix("Llama"), (cls,), {}))
            m.__class__ = renamed[cls]
    assert not any(type(m).__name__.startswith("Llama") for m in model.modules())
    report = patched_keeps_loss_and_grads(model, torch.randint(0, 512, (2, 24)))
    assert (report.patched, report.mlps, report.qkv, report.rms_norms, report.add_norms) == (14, 2, 2, 5, 2)
    assert report.packed_attention == 1


@pytest.mark.parametrize("rank", [16, 40])  # 40: gate's and up's terms in their GEMMs (ops/terms_in_gemm.py)
def test_phi3_gate_up_halves_run_fused_and_in_order(rank, monkeypatch):
    """gate_up_proj's halves through the fused SwiGLU Function, bf16 too; swapping the halves (the mutant)
    breaks the match with stock."""
    import qlora_fast.patching.mlp as mlp
    from qlora_fast import patch_model, unpatch_model
    from qlora_fast.patch import CALLS
    from tests.helpers import loss_and_grads, rel_err

    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_qlora("tiny-phi3", dtype, r=rank, lora_alpha=2 * rank).train()
        ids = torch.randint(0, 512, (2, 24))
        _, stock_grads = loss_and_grads(model, ids)
        patch_model(model, verbose=False)
        CALLS.clear()
        _, grads = loss_and_grads(model, ids)
        assert CALLS["mlp"] == 2
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        assert max(rel_err(grads[n], stock_grads[n]) for n in stock_grads) < tolerance
        blocks = mlp.row_blocks
        monkeypatch.setattr(mlp, "row_blocks", lambda *args: blocks(*args)[::-1])
        _, swapped = loss_and_grads(model, ids)
        assert max(rel_err(swapped[n], stock_grads[n]) for n in stock_grads) > 0.1
        monkeypatch.setattr(mlp, "row_blocks", blocks)
        unpatch_model(model)


def test_phi3_layers_keep_residual_dropouts_that_drop():
    """Phi-3's layer is Llama's while its residual dropouts drop nothing. One that drops when patching is
    left alone; one set to drop after patching runs the stock layer (same seed, same masks, same loss)."""
    from qlora_fast import patch_model, unpatch_model
    from tests.helpers import assert_same_loss_and_grads, loss_and_grads

    model = tiny_qlora("tiny-phi3").train()
    dropouts = [layer.resid_attn_dropout for layer in model.base_model.model.model.layers]
    for dropout in dropouts:
        dropout.p = 0.1
    assert patch_model(model, verbose=False).add_norms == 0
    unpatch_model(model)
    ids = torch.randint(0, 512, (2, 24))
    stock = loss_and_grads(model, ids)
    for dropout in dropouts:
        dropout.p = 0.0
    assert patch_model(model, verbose=False).add_norms == 2
    for dropout in dropouts:
        dropout.p = 0.1
    assert_same_loss_and_grads(stock, loss_and_grads(model, ids))


def test_phi3_partial_rotary_keeps_its_stock_rope(monkeypatch):
    """Phi-3 rotating part of each head (partial_rotary_factor < 1) keeps its own apply_rotary_pos_emb."""
    from qlora_fast.harness.models import MODEL_SHAPES
    from qlora_fast.patch import CALLS
    from tests.helpers import loss_and_grads

    family, config = MODEL_SHAPES["tiny-phi3"]
    monkeypatch.setitem(MODEL_SHAPES, "tiny-phi3", (family, {**config, "partial_rotary_factor": 0.5}))
    model = tiny_qlora("tiny-phi3").train()
    patched_keeps_loss_and_grads(model, torch.randint(0, 512, (2, 24)), verbose=False)
    CALLS.clear()
    loss_and_grads(model, torch.randint(0, 512, (2, 24)))
    assert CALLS["rope"] == 0 and CALLS["mlp"] == 2

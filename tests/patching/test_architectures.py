"""patching/architectures.py: the table's rows beyond the Llama family, and detection by structure."""

import pytest
import torch

from tests.helpers import patched_keeps_loss_and_grads, tiny_qlora


# Rows of the architecture table beyond the Llama family: Gemma-2/3 (q/k/v fused, loss softcapped so kept
# stock), Phi-3 (fused qkv_proj / gate_up_proj served one LoRA layer at a time; Llama-style norms)
@pytest.mark.parametrize("shape, patched, fused", [("tiny-gemma2", 14, {"qkv": 2, "chunked_loss": False}),
                                                   ("tiny-gemma3", 14, {"qkv": 2, "chunked_loss": False}),
                                                   ("tiny-phi3", 8, {"qkv": 0, "rms_norms": 5, "chunked_loss": True})])
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

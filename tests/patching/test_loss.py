"""patching/loss.py: the chunked LM loss in training, the stock loss elsewhere."""

import pytest
import torch

from qlora_fast import patch_model, unpatch_model
from tests.helpers import assert_same_loss_and_grads, loss_and_grads, tiny_qlora


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


@pytest.mark.parametrize("softcap", [0.5, None])
def test_gemma2_softcapped_loss_is_chunked_and_matches_stock(monkeypatch, softcap):
    """Gemma-2's final_logit_softcapping, set where it bites (the logits of a random tiny model are far
    below the default 30), inside the chunked loss: stock's loss and gradients; dropping the cap fails."""
    from qlora_fast.patching import loss as loss_patching

    model = tiny_qlora("tiny-gemma2").train()
    model.config.final_logit_softcapping = 0.5
    ids = torch.randint(0, 512, (2, 16))
    stock = loss_and_grads(model, ids)
    if softcap is None:  # the mutant: the cap never reaches the kernel
        kernel = loss_patching.causal_lm_loss
        monkeypatch.setattr(loss_patching, "causal_lm_loss", lambda *a, softcap=None, **k: kernel(*a, **k))
    assert patch_model(model).chunked_loss
    patched = loss_and_grads(model, ids)
    if softcap is None:
        with pytest.raises(AssertionError):
            assert_same_loss_and_grads(stock, patched)
    else:
        assert_same_loss_and_grads(stock, patched)

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from qlora_fast import patch_model, unpatch_model
from qlora_fast.patching.core import CALLS
from tests.helpers import rel_err, tiny_qlora

SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks of TRL's head


def with_trl_head(shape="tiny-llama", dtype=torch.float32, **settings):
    """A tiny NF4 LoRA model whose causal LM has TRL's fused head, as SFTTrainer installs it."""
    torch.manual_seed(0)
    model = tiny_qlora(shape, dtype).train()
    add_fused_lm_head(model.get_base_model(), **{"outputs": SFT_OUTPUTS, **settings})
    return model


def patched_then_trl_head():
    """with_trl_head's model, patched before TRL's head is installed (a trainer built after patch_model)."""
    torch.manual_seed(0)
    model = tiny_qlora().train()
    patch_model(model, verbose=False)
    add_fused_lm_head(model.get_base_model(), outputs=SFT_OUTPUTS)
    return model


def batch():
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def fused_head_step(model, loss_of=lambda out: out.loss, **extra):
    """TRL's call (as SFTTrainer's compute_loss makes it), a backward of loss_of(outputs), the LoRA grads."""
    model.zero_grad(set_to_none=True)
    out = model(**batch(), fused_lm_head=True, **extra)
    loss_of(out).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_outputs(ours, theirs, tol):
    for field in ("loss", "log_probs", "entropy"):
        assert rel_err(getattr(ours, field).detach(), getattr(theirs, field).detach()) < tol, field
    assert torch.equal(ours.label_mask, theirs.label_mask)
    assert torch.equal(ours.is_top1, theirs.is_top1)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-gemma2"])
def test_sft_trainers_call_gets_trls_outputs_and_gradients(shape):
    stock = fused_head_step(with_trl_head(shape))
    model = with_trl_head(shape)
    assert "TRL's fused-head calls too" in patch_model(model, verbose=False).summary()
    CALLS.clear()
    ours = fused_head_step(model)
    assert CALLS["trl_head"] == 1
    assert_same_outputs(ours[0], stock[0], 1e-5)
    assert ours[1].keys() == stock[1].keys() and all(rel_err(ours[1][n], stock[1][n]) < 1e-4 for n in stock[1])


def test_weighted_tokens_and_an_entropy_term_differentiate_as_trls():
    """TRL's DFT loss weighs each token by its probability; an entropy bonus differentiates the entropy."""
    def loss_of(out):
        return -(out.log_probs * out.log_probs.exp().detach()).sum() / 7 - 0.1 * out.entropy.sum()

    stock = fused_head_step(with_trl_head(), loss_of)
    model = with_trl_head()
    patch_model(model, verbose=False)
    ours = fused_head_step(model, loss_of)
    assert_same_outputs(ours[0], stock[0], 1e-5)
    assert all(rel_err(ours[1][n], stock[1][n]) < 1e-4 for n in stock[1])


def test_pre_shifted_labels_and_num_items_in_batch():
    inputs = batch()
    shift_labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    results = []
    for patched in (False, True):
        model = with_trl_head()
        if patched:
            patch_model(model, verbose=False)
        CALLS.clear()
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    shift_labels=shift_labels, num_items_in_batch=torch.tensor(30), fused_lm_head=True)
        results.append(out)
        assert CALLS["trl_head"] == int(patched)
    assert_same_outputs(results[1], results[0], 1e-5)


def test_bf16_model_under_autocast():
    model = with_trl_head(dtype=torch.bfloat16)
    patch_model(model, verbose=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_head_step(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = fused_head_step(with_trl_head(dtype=torch.bfloat16))
    for field in ("loss", "log_probs", "entropy"):
        assert rel_err(getattr(ours[0], field).detach(), getattr(stock[0], field).detach()) < 2e-2
    assert all(rel_err(ours[1][n], stock[1][n]) < 5e-2 for n in stock[1])


def calls_served(model) -> int:
    """Patches the model, runs one fused-head step: how many calls the chunked kernel answered."""
    patch_model(model, verbose=False)
    CALLS.clear()
    fused_head_step(model)
    return CALLS["trl_head"]


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(outputs=("log_probs", "mean_logits")),
                                      dict(cast_lm_head_to_fp32=True)])
def test_other_trl_settings_keep_trls_head(settings):
    assert calls_served(with_trl_head(**settings)) == 0


def test_a_trainable_head_keeps_trls_head():
    model = with_trl_head()
    model.get_base_model().lm_head.weight.requires_grad_(True)
    assert calls_served(model) == 0


def test_unpatched_model_calls_trls_head_again():
    model = with_trl_head()
    trl_forward = model.get_base_model().forward
    patch_model(model, verbose=False)
    unpatch_model(model)
    assert model.get_base_model().forward == trl_forward
    CALLS.clear()
    fused_head_step(model)
    assert CALLS["trl_head"] == 0


def test_trls_head_installed_after_patch_model_is_answered_too():
    """patch_model, then the trainer (TRL installs its head over the patched forward), as the Colab notebook
    orders them: peft's tuner answers the call."""
    stock = fused_head_step(with_trl_head())
    model = patched_then_trl_head()
    CALLS.clear()
    ours = fused_head_step(model)
    assert CALLS["trl_head"] == 1
    assert_same_outputs(ours[0], stock[0], 1e-5)
    assert all(rel_err(ours[1][n], stock[1][n]) < 1e-4 for n in stock[1])
    unpatch_model(model)
    assert "forward" not in vars(model.base_model)  # the tuner's own forward again


def test_unpatch_keeps_trls_head_installed_over_the_patched_forward():
    """unpatch_model, then the trainer's next step (TRL's head, stock below it), then patch_model again."""
    stock = fused_head_step(with_trl_head())
    model = patched_then_trl_head()
    trl_forward = model.get_base_model().forward
    unpatch_model(model)
    assert model.get_base_model().forward == trl_forward
    CALLS.clear()
    unpatched = fused_head_step(model)
    assert sum(CALLS.values()) == 0  # nothing of qlora_fast ran
    assert_same_outputs(unpatched[0], stock[0], 1e-6)
    assert calls_served(model) == 1
    ids = batch()["input_ids"]
    assert model(input_ids=ids, labels=ids).loss.isfinite()  # a plain call through TRL's and our forward

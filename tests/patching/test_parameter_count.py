"""patch_model's parameter_count: transformers' num_parameters from one walk, the same counts."""

import pytest
import torch
from transformers import PreTrainedModel

from qlora_fast import patch_model, unpatch_model
from qlora_fast.patching import parameter_count
from qlora_fast.patching.parameter_count import count_parameters, use_parameter_count
from tests.helpers import tiny_qlora

FLAGS = [(trainable, embeddings) for trainable in (False, True) for embeddings in (False, True)]
stock_count = PreTrainedModel.num_parameters  # reads only named_modules / named_parameters: any module takes it


@pytest.mark.parametrize("tied", [False, True])
def test_patched_model_counts_what_transformers_counts(tied, monkeypatch):
    model = tiny_qlora(dtype=torch.bfloat16)
    lm = model.base_model.model
    if tied:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    assert lm.is_loaded_in_4bit
    expected = {flags: stock_count(lm, *flags) for flags in FLAGS}
    assert len(set(expected.values())) == 3  # the embeddings are frozen: trainable counts agree
    assert patch_model(model, verbose=False).parameter_count
    assert patch_model(model, verbose=False).parameter_count  # idempotent, and says so
    walks = []
    monkeypatch.setattr(parameter_count, "count_parameters",
                        lambda *args: walks.append(args) or count_parameters(*args))
    # Trainer's call: the peft wrapper forwards the lookup to the transformers model
    for flags in FLAGS:
        assert model.num_parameters(*flags) == expected[flags]
    assert len(walks) == 4
    unpatch_model(model)
    assert "num_parameters" not in vars(lm) and model.num_parameters(False, True) == expected[(False, True)]


def test_a_count_transformers_disagrees_with_is_not_installed(monkeypatch):
    model = tiny_qlora(dtype=torch.bfloat16)
    monkeypatch.setattr(parameter_count, "count_parameters",  # mutant: 4-bit weights counted by storage bytes
                        lambda m, trainable=False, embeddings=False: sum(p.numel() for p in m.parameters()))
    assert not use_parameter_count(model)
    assert "num_parameters" not in vars(model.base_model.model)


class SharedFirstInALinear(torch.nn.Module):
    """A weight first met in a Linear, then as an Embedding's: stock names it after the Linear and counts
    it with exclude_embeddings; a second Embedding, shared with a later Linear, is excluded."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.embed = torch.nn.Embedding(10, 6)
        self.embed.weight = self.head.weight
        self.other = torch.nn.Embedding(7, 3)
        self.tail = torch.nn.Linear(3, 7, bias=False)
        self.tail.weight = self.other.weight
        self.shared_block = self.block = torch.nn.Linear(3, 3)  # one module under two names
        self.block.weight.requires_grad_(False)


def test_walk_order_and_deduplication_are_named_parameters():
    module = SharedFirstInALinear()
    for flags in FLAGS:
        assert count_parameters(module, *flags) == stock_count(module, *flags), flags


def test_parameters_lists_the_stock_parameters_in_one_walk(monkeypatch):
    """Trainer's clip and zero_grad call model.parameters(): the walk's list is the stock one, by identity
    and order (tied weights once), recurse=False keeps stock, and unpatch_model removes it."""
    model = tiny_qlora(dtype=torch.bfloat16)
    lm = model.base_model.model
    lm.lm_head.weight = lm.model.embed_tokens.weight
    stock = list(model.parameters())
    patch_model(model, verbose=False)
    assert "parameters" in vars(model)
    walks, owners = [], parameter_count.parameter_owners
    monkeypatch.setattr(parameter_count, "parameter_owners", lambda m: walks.append(m) or owners(m))
    patched = list(model.parameters())
    assert walks == [model] and len(patched) == len(stock) and all(a is b for a, b in zip(patched, stock))
    assert list(model.parameters(recurse=False)) == []
    unpatch_model(model)
    assert "parameters" not in vars(model) and len(list(model.parameters())) == len(stock)


def test_a_walk_that_differs_from_stock_is_not_installed(monkeypatch):
    model = tiny_qlora(dtype=torch.bfloat16)
    owners = parameter_count.parameter_owners
    monkeypatch.setattr(parameter_count, "parameter_owners", lambda m: owners(m)[1:])  # mutant: one missed
    patch_model(model, verbose=False)
    assert "parameters" not in vars(model)

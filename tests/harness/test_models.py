"""The benchmark shapes build as the families the architecture table serves (on the meta device: no weights)."""

import pytest
import torch

from qlora_fast.harness.models import MODEL_SHAPES, model_config
from qlora_fast.patching.architectures import has


@pytest.mark.parametrize("shape", [s for s in MODEL_SHAPES if not s.startswith("tiny-")])
def test_every_real_shape_is_a_family_the_table_serves(shape):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    assert has(model, "plain_head")
    layers = model.model.layers
    assert all(has(layer.mlp, "gated_mlp") or has(layer.mlp, "gate_up_mlp") for layer in layers)
    special = (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    assert all(t < model.config.vocab_size for t in special if isinstance(t, int))

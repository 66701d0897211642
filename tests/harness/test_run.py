"""harness/run.py: the batches the harness feeds, padded or packed as TRL would."""

import torch

from qlora_fast.harness.models import byte_tokenizer
from qlora_fast.harness.run import packed_token_batches, token_batches


def test_packed_batches_are_padding_free_rows():
    records = [{"text": "a" * n} for n in (10, 25, 7, 40)]
    tokenizer = byte_tokenizer()
    padded = token_batches(records, tokenizer, 4, 32, 1)[0]
    packed = packed_token_batches(records, tokenizer, 4, 32, 1)[0]
    lengths = padded["attention_mask"].sum(1).tolist()  # the same records, truncated alike
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][padded["attention_mask"].bool()])
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert (packed["labels"] == -100).sum() == len(lengths)  # no prediction across a boundary
    assert packed["use_cache"] is False

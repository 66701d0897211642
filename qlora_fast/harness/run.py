"""Batches for the harness: a dataset's records tokenized, or random tokens of a size."""

import torch


def _render(record: dict, tokenizer) -> str:
    """One training record as the text the model sees (prompt and completion joined)."""
    if "text" in record:
        return record["text"]
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):  # conversational prompt-completion
        return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return prompt + completion


def _text_groups(records, tokenizer, batch_size: int, steps: int) -> list[list[str]]:
    """`steps` groups of `batch_size` rendered records, cycling through the data in order."""
    texts = [_render(records[i % len(records)], tokenizer) for i in range(batch_size * steps)]
    return [texts[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def token_batches(records, tokenizer, batch_size: int, seq_len: int, steps: int) -> list[dict]:
    """`steps` padded batches of `batch_size` records, cycling through the data in order."""
    batches = []
    for texts in _text_groups(records, tokenizer, batch_size, steps):
        enc = tokenizer(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def packed_batch(rows) -> dict:
    """Token rows (lists or 1-D tensors) as TRL's padding-free packing hands them to the model: one row,
    position_ids restarting at each, no attention mask, no label across a boundary, no KV cache."""
    ids = torch.cat([torch.as_tensor(row) for row in rows])[None]
    position_ids = torch.cat([torch.arange(len(row)) for row in rows])[None]
    return {"input_ids": ids, "position_ids": position_ids, "labels": ids.masked_fill(position_ids == 0, -100),
            "use_cache": False}


def packed_token_batches(records, tokenizer, batch_size: int, seq_len: int, steps: int) -> list[dict]:
    """`steps` padding-free batches (packed_batch) of `batch_size` records, each truncated to `seq_len`."""
    return [packed_batch(tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"])
            for texts in _text_groups(records, tokenizer, batch_size, steps)]


def on_device(batch: dict, device) -> dict:
    """The batch's tensors moved to `device`; flags (use_cache) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def random_batches(vocab_size: int, size: str, steps: int) -> list[dict]:
    """`steps` batches of random tokens for a "BATCHxSEQ" size, the same for every caller of that size."""
    batch, seq = map(int, size.split("x"))
    g = torch.Generator().manual_seed(batch * seq)
    return [{"input_ids": (ids := torch.randint(0, vocab_size, (batch, seq), generator=g)), "labels": ids}
            for _ in range(steps)]

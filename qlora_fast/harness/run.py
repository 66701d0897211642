"""`qlora-fast compare CONFIG`: the training config's model, adapter and data, stock vs patched."""

from pathlib import Path

import torch

from .compare import Comparison, compare_stock_and_patched
from .report import write_report
from .verify import VerifyReport, verify


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


def token_batches(records, tokenizer, batch_size: int, seq_len: int, steps: int) -> list[dict]:
    """`steps` padded batches of `batch_size` records, cycling through the data in order."""
    texts = [_render(records[i % len(records)], tokenizer) for i in range(batch_size * steps)]
    batches = []
    for i in range(steps):
        enc = tokenizer(texts[i * batch_size:(i + 1) * batch_size], truncation=True, max_length=seq_len,
                        padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def _model_and_batches(cfg, steps: int):
    """The config's 4-bit model with its adapter (checkpointing as configured), `steps` batches of its
    data, and its compute dtype and bf16/fp16 flags."""
    from ..cli.data import load_training_data
    from ..cli.train import add_adapter, load_base_model, precision

    train_data, _ = load_training_data(cfg)
    compute_dtype, bf16, fp16 = precision(cfg)
    model, tokenizer = load_base_model(cfg, compute_dtype)
    model = add_adapter(cfg, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = token_batches(train_data, tokenizer, cfg.micro_batch_size, cfg.sequence_len, steps)
    return model, batches, compute_dtype, bf16 or fp16


def verify_config(cfg, steps: int = 2) -> VerifyReport:
    """`qlora-fast verify CONFIG`: stock against patched on the config's model and data, the forward under
    autocast where training would run it so (bf16/fp16); prints the per-matrix table and the verdict."""
    from ..cli.config import patch_options

    model, batches, compute_dtype, mixed = _model_and_batches(cfg, steps)
    result = verify(model, batches, compute_dtype, autocast_dtype=compute_dtype if mixed else None,
                    seed=cfg.seed, **patch_options(cfg))
    print(result.table())
    print(result.verdict(), flush=True)
    return result


def compare_config(cfg, steps: int = 8, out_dir: str | None = None, timing_rounds: int = 0) -> Comparison:
    from ..cli.config import patch_options

    model, batches, compute_dtype, _ = _model_and_batches(cfg, steps)
    result = compare_stock_and_patched(model, batches, compute_dtype, lr=cfg.learning_rate, seed=cfg.seed,
                                       timing_rounds=timing_rounds, **patch_options(cfg))
    out = write_report(result, out_dir or str(Path(cfg.output_dir) / "compare"), cfg.base_model)
    print(f"{'PASS' if result.passed else 'FAIL'}: max rel loss diff {result.max_rel_loss_diff:.2e}, "
          f"speedup {result.speedup:.2f}x; report in {out}", flush=True)
    if not torch.cuda.is_available():
        print("note: this ran on the CPU, where the kernels run in Triton's interpreter: the speed figures say "
              "nothing about a GPU, the parity figures hold", flush=True)
    return result


def random_batches(vocab_size: int, size: str, steps: int) -> list[dict]:
    """`steps` batches of random tokens for a "BATCHxSEQ" size, the same for every caller of that size."""
    batch, seq = map(int, size.split("x"))
    g = torch.Generator().manual_seed(batch * seq)
    return [{"input_ids": (ids := torch.randint(0, vocab_size, (batch, seq), generator=g)), "labels": ids}
            for _ in range(steps)]

"""unsloth's training step on the same setup as bench/train_step.py, for the side-by-side row (GPU only,
WITH_PEERS=1 site). Runs in its own process because importing unsloth patches transformers globally.

  python bench/train_step_unsloth.py --out $OUT/unsloth.md

The random-init model is written to local disk first (unsloth loads models by path), with the
byte tokenizer; unsloth quantizes it to NF4 itself. Timing and memory use qlora_fast.harness' loop.
"""

import unsloth  # noqa: F401  (first, as unsloth requires)

import argparse
import tempfile

import torch

from qlora_fast.harness.compare import OPTIMIZERS, train_steps
from qlora_fast.harness.models import byte_tokenizer, random_causal_lm
from qlora_fast.harness.run import random_batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--sizes", default="1x2048,4x512,4x2048")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="unsloth.md")
    parser.add_argument("--optimizer", default="fused", choices=sorted(OPTIMIZERS),
                        help="AdamW fused (Trainer's default) or foreach (figures through session 4)")
    args = parser.parse_args()
    from unsloth import FastLanguageModel

    path = tempfile.mkdtemp()
    dense = random_causal_lm(args.shape, torch.bfloat16, "cuda")
    dense.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    del dense
    torch.cuda.empty_cache()
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=True,
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=0)
    vocab = model.config.vocab_size
    adapters = [p for p in model.parameters() if p.requires_grad]
    lines = [f"unsloth {unsloth.__version__}, {torch.cuda.get_device_name()}, model {args.shape} random init, "
             f"{args.steps} steps (first excluded), AdamW {args.optimizer}; trainable: {sum(p.numel() for p in adapters) / 1e6:.1f}M "
             f"parameters in {sorted({str(p.dtype) for p in adapters})}", "", "| batch x seq | unsloth tok/s | unsloth tok/s (median step) | unsloth peak GiB | losses |",
             "|---|---|---|---|---|"]
    for size in args.sizes.split(","):
        batches = random_batches(vocab, size, args.steps)
        stats = train_steps(model, batches, optimizer=args.optimizer)
        lines.append(f"| {size} | {stats.tokens_per_second:.0f} | {stats.median_tokens_per_second:.0f} | "
                     f"{stats.peak_memory_gib:.2f} | "
                     f"{[round(x, 4) for x in stats.losses]} |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    open(args.out, "w").write(text)


if __name__ == "__main__":
    main()

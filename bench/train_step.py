"""Training-step throughput and peak memory: stock peft vs peft + qlora_fast (GPU, via the device tool).

  python bench/train_step.py --shape llama-3-8b --out $OUT/train_step.md

Random-init model of the named shape, quantized to NF4 (double quant, bf16 compute), LoRA r=16 on all
7 linear projections, gradient checkpointing, AdamW. Both runs in one process from the same LoRA init
and batches (qlora_fast.harness), so the tokens/s ratio and the loss difference are side by side.
"""

import argparse
import datetime

import torch
import transformers
import triton

from qlora_fast.harness.compare import OPTIMIZERS, compare_stock_and_patched
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.run import random_batches


# Each row adds one patch_model option to the row above; the last is patch_model's default.
_OFF = {"fused_mlp": False, "fused_qkv": False, "offload_checkpoints": False, "rms_norm": False, "add_norm": False,
        "rope": False}
_RMS = dict(_OFF, fused_mlp=True, offload_checkpoints=True, rms_norm=True)
VARIANTS = {"LoRA layers + chunked loss": _OFF,
            "+ fused MLP": dict(_OFF, fused_mlp=True),
            "+ offloaded checkpoints": dict(_OFF, fused_mlp=True, offload_checkpoints=True),
            "+ RMSNorm kernel": _RMS,
            "+ fused QKV": dict(_RMS, fused_qkv=True),
            "+ RoPE kernel": dict(add_norm=False),
            "+ residual add in RMSNorm": {}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--sizes", default="1x2048,4x512,4x2048", help="batch x seq, comma-separated")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved stock/patched timing rounds")
    parser.add_argument("--out", default="train_step.md")
    parser.add_argument("--variants", default=None, help="comma-separated names from VARIANTS (default: all)")
    parser.add_argument("--optimizer", default="fused", choices=sorted(OPTIMIZERS),
                        help="AdamW fused (Trainer's default) or foreach (figures through session 4)")
    parser.add_argument("--tile-meta", type=int, default=0,
                        help="index into kernels/low_rank.py's CANDIDATE_META: the tile kernels' launch for this run")
    args = parser.parse_args()
    if args.tile_meta:  # the kernels' default argument is that dict itself: update it in place
        from qlora_fast.kernels.low_rank import CANDIDATE_META

        CANDIDATE_META[0].update(CANDIDATE_META[args.tile_meta])

    model = quantize_to_nf4_(random_causal_lm(args.shape, torch.bfloat16, "cuda"))
    model.config.use_cache = False
    model = add_lora(model, r=16, lora_alpha=16, init_b_std=1e-3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    adapters = [p for p in model.parameters() if p.requires_grad]

    import bitsandbytes, peft
    lines = [f"Date {datetime.date.today()}, GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
             f"bitsandbytes {bitsandbytes.__version__}; model {args.shape} (random init, NF4 double quant, bf16), "
             f"LoRA r=16 all linear ({sum(p.numel() for p in adapters) / 1e6:.1f}M trainable parameters in "
             f"{sorted({str(p.dtype) for p in adapters})}), gradient checkpointing; tile kernels' launch "
             f"CANDIDATE_META[{args.tile_meta}]; loss parity over {args.steps} AdamW ({args.optimizer}) steps, tokens/s "
             f"from the median of {args.timing_rounds} interleaved stock/patched forward+backward rounds"
             "; the AdamW column times the loss-parity run's optimizer steps (2 to last)",
             "", "| batch x seq | qlora_fast variant | stock tok/s | qlora_fast tok/s | speedup | qlora_fast tok/s "
             "(AdamW steps) | qlora_fast tok/s (AdamW steps, median) | stock peak GiB | qlora_fast peak GiB | max rel loss diff | LoRA update rel diff | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    for size in args.sizes.split(","):
        batches = random_batches(vocab, size, args.steps)
        for variant in chosen:
            c = compare_stock_and_patched(model, batches, torch.bfloat16, timing_rounds=args.timing_rounds,
                                          optimizer=args.optimizer,
                                          **VARIANTS[variant])
            lines.append(f"| {size} | {variant} | {c.tokens_per_second('stock'):.0f} | "
                         f"{c.tokens_per_second('patched'):.0f} | "
                         f"{c.speedup:.2f}x | {c.patched.tokens_per_second:.0f} | "
                         f"{c.patched.median_tokens_per_second:.0f} | {c.stock.peak_memory_gib:.2f} | {c.patched.peak_memory_gib:.2f} | "
                         f"{c.max_rel_loss_diff:.2e} | {c.weight_rel_diff:.2e} | {'pass' if c.passed else 'FAIL'} |")
            print(lines[-1], "losses", [round(x, 4) for x in c.stock.losses],
                  [round(x, 4) for x in c.patched.losses], flush=True)
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()

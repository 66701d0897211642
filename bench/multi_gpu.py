"""Multi-GPU check (device tool, nvidia-h200-x2): `qlora-fast train` on one GPU with the global batch, then
with torchrun on N GPUs with 1/N of it each, data parallel (ddp) or sharded (fsdp: FSDP2, 4-bit weights
stored as bf16); compares the logged losses, tokens/s and peak GPU memory (rank 0).

  python bench/multi_gpu.py --gpus 2 --mode fsdp --out $OUT/fsdp.md
"""

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml


def synthetic_corpus(path: Path, n: int = 3000, words: int = 700):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(vocab, k=words))}) + "\n" for _ in range(n)))


def run(cfg: dict, work: Path, name: str, gpus: int, mode: str) -> dict:
    cfg = dict(cfg, output_dir=str(work / name), distributed=mode if gpus > 1 else "none")
    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)] if gpus > 1
                else [sys.executable])
    subprocess.run(launcher + ["-m", "qlora_fast.cli.main", "train", str(work / f"{name}.yaml")], check=True,
                   env=dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                            CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus)))))
    return json.loads((work / name / "train_summary.json").read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--patch", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-patch: stock peft in both runs, to tell qlora_fast's share of a difference")
    parser.add_argument("--out", default="multi_gpu.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    synthetic_corpus(work / "corpus.jsonl")
    base = dict(base_model=f"random:{args.shape}", datasets=[{"path": str(work / "corpus.jsonl"), "type": "text"}],
                sequence_len=1024, max_steps=args.steps, learning_rate=2e-4, lr_scheduler="constant",
                logging_steps=1, gradient_checkpointing=True, bf16=True, seed=0,
                bnb_4bit_quant_storage="bfloat16" if args.mode == "fsdp" else "uint8", patch=args.patch)
    single = run(dict(base, micro_batch_size=args.global_batch), work, "single", 1, args.mode)
    multi = run(dict(base, micro_batch_size=args.global_batch // args.gpus), work, "multi", args.gpus, args.mode)
    tps = {k: s["tokens_per_second_after_warmup"] for k, s in (("single", single), ("multi", multi))}
    diffs = [abs(a - b) / a for a, b in zip(single["logged_losses"], multi["logged_losses"])]
    text = (f"Date {datetime.date.today()}, {args.gpus}x {torch.cuda.get_device_name()}, torch {torch.__version__}; "
            f"random-init {args.shape}, NF4 (storage {base['bnb_4bit_quant_storage']}) + LoRA r=16 all linear, "
            f"{'patched' if args.patch else 'stock peft (not patched)'}, global batch {args.global_batch} x 1024 tokens, {args.steps} steps, gradient checkpointing, "
            f"bf16\n\n| run | tokens/s (after 2 warm-up steps) | peak GiB (rank 0) | losses |\n|---|---|---|---|\n"
            f"| 1 GPU, micro batch {args.global_batch} | {tps['single']:.0f} | {single['peak_gpu_memory_gib']:.1f} | "
            f"{single['logged_losses']} |\n"
            f"| {args.gpus} GPUs {args.mode.upper()}, micro batch {args.global_batch // args.gpus} | "
            f"{tps['multi']:.0f} | {multi['peak_gpu_memory_gib']:.1f} | {multi['logged_losses']} |\n\n"
            f"Scaling {args.gpus}-GPU / 1-GPU tokens/s: {tps['multi'] / tps['single']:.2f}x; "
            f"max relative loss difference per step: {max(diffs):.2e}\n")
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""What holds GPU memory at the peak of a patched training step (Llama-3-8B shape, AdamW).

  python bench/memory_step.py --size 1x2048 --out $OUT/memory

Runs `--warmup` AdamW steps (default 2, so optimizer state exists), records the allocator's history
during the next, and writes the phase peaks and, at the step's peak, the live allocations grouped by the
Python frame in qlora_fast / transformers / peft / torch.optim that made them.
"""

import argparse
import collections
import json
import os

import torch

from qlora_fast import patch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.run import random_batches

GIB = 2**30


def _phase_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / GIB


def _origin(frames) -> str:
    """The innermost frame of this project's, transformers' or peft's code that allocated the block."""
    for frame in frames:
        name = frame["filename"]
        if any(part in name for part in ("qlora_fast", "transformers/", "peft/", "torch/optim")):
            return f"{name.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame['line']} {frame['name']}"
    return "other"


def live_at_peak(snapshot) -> tuple[float, dict]:
    """Replays the recorded alloc/free events; returns the peak GiB and the bytes live then, by origin."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _origin(event.get("frames", [])))
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    by_origin = collections.Counter()
    for size, origin in at_peak.values():
        by_origin[origin] += size
    return peak / GIB, {k: round(v / 2**20, 1) for k, v in by_origin.most_common(25)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--size", default="1x2048")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="memory")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    model = quantize_to_nf4_(random_causal_lm(args.shape, torch.bfloat16, "cuda"))
    model.config.use_cache = False
    model = add_lora(model, r=16, lora_alpha=16, init_b_std=1e-3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_model(model, verbose=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {k: v.cuda() for k, v in random_batches(model.config.vocab_size, args.size, 1)[0].items()}

    def step(record=False):
        loss, forward = _phase_peak(lambda: model(**batch).loss)
        _, backward = _phase_peak(loss.backward)
        _, adamw = _phase_peak(optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        return {"forward": forward, "backward": backward, "adamw": adamw}

    for _ in range(args.warmup):
        step()
    static = torch.cuda.memory_allocated() / GIB
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    phases = step()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, by_origin = live_at_peak(snapshot)
    report = {"size": args.size, "warm-up steps": args.warmup, "allocated between steps GiB": static, "phase peaks GiB": phases,
              "replayed peak GiB (blocks allocated during the step)": peak, "live at peak MiB by origin": by_origin}
    print(json.dumps(report, indent=1))
    with open(os.path.join(args.out, f"memory_{args.size}_warmup{args.warmup}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Where one training step's time goes: GPU kernel time against wall time, per patch_model variant.

  python bench/profile_step.py --sizes 4x512,4x2048 --out $OUT/profile.md

Random-init model of the named shape (NF4, LoRA r=16 all linear, gradient checkpointing), one forward +
backward per variant under torch.profiler after two warm-up steps. Wall time far above the summed kernel
time means the step is host-bound (launches and Python), not GPU-bound.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qlora_fast import patch_model, unpatch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.run import random_batches

VARIANTS = {"stock peft": None, "qlora_fast default": {}, "qlora_fast + RoPE kernel": {"rope": True}}


def _step(model, batch):
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def _kernel_events(prof):
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _peaks_gib(model, batch):
    """Peak allocated GiB during the forward and during the backward of one step."""
    gib = 2**30
    torch.cuda.reset_peak_memory_stats()
    loss = model(**batch).loss
    torch.cuda.synchronize()
    forward = torch.cuda.max_memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    backward = torch.cuda.max_memory_allocated() / gib
    model.zero_grad(set_to_none=True)
    return forward, backward


def profile_variant(model, batch, options, timed_steps=5):
    """(median wall ms, summed kernel ms, kernel launches, peak GiB forward / backward, table of the top
    kernels) of one step."""
    if options is not None:
        patch_model(model, verbose=False, **options)
    try:
        for _ in range(2):
            _step(model, batch)
        walls = []
        for _ in range(timed_steps):
            started = time.perf_counter()
            _step(model, batch)
            walls.append((time.perf_counter() - started) * 1e3)
        peaks = _peaks_gib(model, batch)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _step(model, batch)
    finally:
        unpatch_model(model)
    kernels = _kernel_events(prof)
    kernel_ms = sum(e.device_time for e in kernels) / 1e3
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    return statistics.median(walls), kernel_ms, len(kernels), peaks, table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--sizes", default="4x512,4x2048", help="batch x seq, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--out", default="profile.md")
    args = parser.parse_args()

    model = quantize_to_nf4_(random_causal_lm(args.shape, torch.bfloat16, "cuda"))
    model.config.use_cache = False
    model = add_lora(model, r=16, lora_alpha=16, init_b_std=1e-3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    summary = ["| batch x seq | variant | wall ms (median of 5, no profiler) | kernel ms | kernels launched | "
               "wall / kernel | peak GiB forward | peak GiB backward |", "|---|---|---|---|---|---|---|---|"]
    tables = []
    for size in args.sizes.split(","):
        batch = {k: v.cuda() for k, v in random_batches(model.config.vocab_size, size, 1)[0].items()}
        for name in args.variants.split(","):
            wall, kernel, launches, (fwd_gib, bwd_gib), table = profile_variant(model, batch, VARIANTS[name])
            summary.append(f"| {size} | {name} | {wall:.1f} | {kernel:.1f} | {launches} | {wall / kernel:.2f} | "
                           f"{fwd_gib:.2f} | {bwd_gib:.2f} |")
            print(summary[-1], flush=True)
            tables.append(f"### {size}, {name}\n\n```\n{table}\n```\n")
    text = "\n".join(summary) + "\n\n" + "\n".join(tables)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n".join(summary))


if __name__ == "__main__":
    main()

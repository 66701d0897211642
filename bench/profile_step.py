"""Where one training step's time goes: GPU kernel time against wall time, per patch_model variant.

  python bench/profile_step.py --sizes 4x512,4x2048,packed8192 --out $OUT/profile.md
  python bench/profile_step.py --prepared --sizes 4x2048 --out $OUT/profile_peft.md   # peft's recipe

Random-init model of the named shape (NF4, LoRA r=16 all linear, gradient checkpointing), one forward +
backward per variant under torch.profiler after two warm-up steps. Wall time far above the summed kernel
time means the step is host-bound (launches and Python), not GPU-bound. `packedN` is one padding-free row
of N tokens packed from documents of 100-900 tokens (position_ids restarting, no mask: TRL's packing=True);
the attention column is the share of kernel time in attention kernels. `--prepared`: peft's QLoRA recipe
(bench/recipes.py's "peft"): `prepare_model_for_kbit_training` (fp32 embeddings, norms and head) and each
step under autocast(bf16), as Trainer(bf16=True) runs it.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from idle import step_report
from recipes import switch_candidate
from qlora_fast import patch_model, unpatch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.run import packed_batch, random_batches
from qlora_fast.ops import linear_cross_entropy
from qlora_fast.ops.offloaded_checkpoint import keep_outcomes

VARIANTS = {"stock peft": None, "qlora_fast default": {},
            "qlora_fast dense packed mask": {"packed_attention": False},
            "qlora_fast attention recomputed": {"keep_attention_outputs": False}}
ATTENTION_KERNELS = ("flash", "fmha", "attention", "cudnn", "sdpa")  # substrings of attention kernels' names


def _step(model, batch, autocast=False):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def _kernel_events(prof):
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _peaks_gib(model, batch, autocast):
    """Peak allocated GiB during the forward and during the backward of one step."""
    gib = 2**30
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    torch.cuda.synchronize()
    forward = torch.cuda.max_memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    backward = torch.cuda.max_memory_allocated() / gib
    model.zero_grad(set_to_none=True)
    return forward, backward


def packed_documents(vocab_size: int, tokens: int, seed: int = 0) -> dict:
    """One padding-free row of `tokens` random tokens packed from documents of 100-900 tokens
    (harness.run.packed_batch: position_ids restart at each document, no mask, no cache)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(int(torch.randint(100, 901, (1,), generator=g)), tokens - sum(lengths)))
    return packed_batch(torch.randint(0, vocab_size, (tokens,), generator=g).split(lengths))


def batch_for(size: str, vocab_size: int) -> dict:
    batch = (packed_documents(vocab_size, int(size.removeprefix("packed"))) if size.startswith("packed")
             else random_batches(vocab_size, size, 1)[0])
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def profile_variant(model, batch, options, autocast=False, timed_steps=5, profiled=True):
    """(median wall ms, summed kernel ms, attention kernels' share, kernel launches, peak GiB forward /
    backward, keep_outcomes of a timed step, report of the top kernels and the GPU's idle gaps) of one
    step; without `profiled`, the kernel figures are None."""
    if options is not None:
        patch_model(model, verbose=False, **options)
    try:
        for _ in range(2):
            _step(model, batch, autocast)
        walls = []
        for _ in range(timed_steps):
            keep_outcomes(reset=True)
            started = time.perf_counter()
            _step(model, batch, autocast)
            walls.append((time.perf_counter() - started) * 1e3)
        keeps = keep_outcomes(reset=True)
        peaks = _peaks_gib(model, batch, autocast)
        if not profiled:
            return statistics.median(walls), None, None, None, peaks, keeps, ""
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            _step(model, batch, autocast)
    finally:
        unpatch_model(model)
    kernels = _kernel_events(prof)
    kernel_ms = sum(e.device_time for e in kernels) / 1e3
    attention_ms = sum(e.device_time for e in kernels if any(s in e.name.lower() for s in ATTENTION_KERNELS)) / 1e3
    return (statistics.median(walls), kernel_ms, attention_ms / kernel_ms, len(kernels), peaks, keeps,
            step_report(prof) + "\n\n" + gemm_table(prof))


GEMM_OPS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}  # where the (M, K) operand sits


def gemm_table(prof, rows: int = 25) -> str:
    """The step's matrix products grouped by operand shapes: calls, CUDA ms and TFLOP/s (2MNK a call),
    the most time first: which products run below the GEMM rate the large ones reach."""
    lines = ["| op | (M, K) x (K, N) | calls | CUDA ms | TFLOP/s |", "|---|---|---|---|---|"]
    found = []
    for e in prof.key_averages(group_by_input_shape=True):
        first = GEMM_OPS.get(e.key)
        shapes = e.input_shapes
        if first is None or len(shapes) < first + 2 or len(shapes[first]) != 2 or len(shapes[first + 1]) != 2:
            continue
        (m, k), (_, n) = shapes[first], shapes[first + 1]
        ms = e.device_time_total / 1e3
        found.append((ms, f"| {e.key} | ({m}, {k}) x ({k}, {n}) | {e.count} | {ms:.1f} | "
                          f"{2 * m * n * k * e.count / (ms * 1e-3) / 1e12 if ms else 0:.0f} |"))
    return "\n".join(lines + [line for _, line in sorted(found, reverse=True)[:rows]])


def variant_rows(model, batch, size: str, name: str, args) -> tuple[list[str], str]:
    """The summary rows of one variant at one size (its profiled step, then one a --chunk-log2), each
    printed as it comes, and its report; a qlora_fast:CANDIDATE variant is the default with its switch on."""
    options = VARIANTS["qlora_fast default" if ":" in name else name]
    wall, kernel, attention, launches, (fwd_gib, bwd_gib), keeps, report = profile_variant(
        model, batch, options, autocast=args.prepared)
    kept = ", ".join(f"{why} {n}" for why, n in sorted(keeps.items())) or "-"
    lines = [f"| {size} | {name} | {wall:.1f} | {kernel:.1f} | {attention:.0%} | {launches} | "
             f"{wall / kernel:.2f} | {fwd_gib:.2f} | {bwd_gib:.2f} | {kept} |"]
    print(lines[-1], flush=True)
    for log2 in filter(None, args.chunk_log2.split(",")):
        default, linear_cross_entropy.CHUNK_ELEMENTS = linear_cross_entropy.CHUNK_ELEMENTS, 2 ** int(log2)
        try:
            wall, *_, (fwd_gib, bwd_gib), kept, _ = profile_variant(
                model, batch, options, autocast=args.prepared, profiled=False)
        finally:
            linear_cross_entropy.CHUNK_ELEMENTS = default
        lines.append(f"| {size} | {name}, 2^{log2} logits a loss chunk | {wall:.1f} | | | | | "
                     f"{fwd_gib:.2f} | {bwd_gib:.2f} | |")
        print(lines[-1], flush=True)
    return lines, f"### {size}, {name}\n\n{report}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--sizes", default="4x512,4x2048,packed8192",
                        help="comma-separated: BATCHxSEQ, or packedN (one padding-free row of N tokens)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated names from VARIANTS, or qlora_fast:CANDIDATE (bench/recipes.py's "
                             "CANDIDATES: the default with that switch on)")
    parser.add_argument("--out", default="profile.md")
    parser.add_argument("--prepared", action="store_true",
                        help="peft's recipe: prepare_model_for_kbit_training, steps under autocast(bf16)")
    parser.add_argument("--chunk-log2", default="",
                        help="comma-separated log2 of the loss' logits per chunk (CHUNK_ELEMENTS) to time "
                             "each variant with as well (timings and peaks, no profile)")
    args = parser.parse_args()

    model = quantize_to_nf4_(random_causal_lm(args.shape, torch.bfloat16, "cuda"))
    model.config.use_cache = False
    if args.prepared:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.enable_input_require_grads()
    model = add_lora(model, r=16, lora_alpha=16, init_b_std=1e-3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    summary = ["| batch x seq | variant | wall ms (median of 5, no profiler) | kernel ms | attention share | "
               "kernels launched | wall / kernel | peak GiB forward | peak GiB backward | kept for the recompute |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    tables = []
    for size in args.sizes.split(","):
        batch = batch_for(size, model.config.vocab_size)
        for name in args.variants.split(","):
            switch_candidate(name)
            try:
                lines, table = variant_rows(model, batch, size, name, args)
            finally:
                switch_candidate(name, on=False)
            summary += lines
            tables.append(table)
    text = "\n".join(summary) + "\n\n" + "\n".join(tables)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n".join(summary))


if __name__ == "__main__":
    main()

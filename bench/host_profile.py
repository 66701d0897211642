"""Where the host time of a patched training step goes, sampled on every thread (the autograd engine runs
backward on its own thread, which cProfile does not see).

  python bench/host_profile.py --size 4x512 --steps 30            # the workload, alone
  py-spy record -r 2000 -f raw -o $OUT/stacks.txt -- python bench/host_profile.py --size 4x512
  python bench/host_profile.py --summarize $OUT/stacks.txt         # here: self and inclusive time
  python bench/host_profile.py --phases --size 4x512               # wall vs GPU kernel time per phase
  python bench/host_profile.py --cprofile --size 4x512             # cProfile of the forward (main thread)

The summary gives, per source line of the step's Python, the share of samples where it is the innermost
frame (self: its own Python plus the C calls it makes) and where it is anywhere on the stack (inclusive).
"""

import argparse
import itertools
import time
from collections import Counter


def cprofile_forward(size: str, steps: int, top: int):
    """cProfile over `steps` training forwards after warm-up steps. The forward runs on the main thread
    (backward's recompute runs the same layer code on autograd's thread, which cProfile does not see)."""
    import cProfile
    import io
    import pstats

    import torch

    model, batch = _patched_model(size)
    for _ in range(3):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    profiler = cProfile.Profile()
    for _ in range(steps):
        torch.cuda.synchronize()
        profiler.enable()
        loss = model(**batch).loss
        torch.cuda.synchronize()
        profiler.disable()
        loss.backward()
        model.zero_grad(set_to_none=True)
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
        print(out.getvalue())


def _patched_model(size: str, patched: bool = True):
    import torch

    from qlora_fast import patch_model
    from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
    from qlora_fast.harness.run import random_batches

    model = quantize_to_nf4_(random_causal_lm("llama-3-8b", torch.bfloat16, "cuda"))
    model.config.use_cache = False
    model = add_lora(model, r=16, lora_alpha=16, init_b_std=1e-3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if patched:
        patch_model(model, verbose=False)
    batch = {k: v.cuda() for k, v in random_batches(model.config.vocab_size, size, 1)[0].items()}
    return model, batch


def run(size: str, steps: int, options: str | None):
    import torch

    model, batch = _patched_model(size, patched=options != "stock")
    for step in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(f"step {step}: {(time.perf_counter() - started) * 1e3:.1f} ms", flush=True)


def _kernel_ms(fn):
    """(wall ms, summed GPU kernel ms) of fn(), synchronized before and after."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return out, wall, sum(e.device_time for e in kernels) / 1e3


def phases(sizes: str, steps: int):
    """Forward and backward of one step, each timed alone: wall (no profiler) and GPU kernel time."""
    import statistics

    import torch

    from qlora_fast import patch_model, unpatch_model
    from qlora_fast.harness.run import random_batches

    model, _ = _patched_model(sizes.split(",")[0], patched=False)
    print("| size | variant | forward wall ms | forward kernel ms | backward wall ms | backward kernel ms |")
    print("|---|---|---|---|---|---|")
    for size, (name, options) in itertools.product(sizes.split(","), [("stock", None), ("default", {}), ("no offload", {"offload_checkpoints": False})]):
        batch = {k: v.cuda() for k, v in random_batches(model.config.vocab_size, size, 1)[0].items()}
        if options is not None:
            patch_model(model, verbose=False, **options)
        walls = {"forward": [], "backward": []}
        for step in range(steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            loss = model(**batch).loss
            torch.cuda.synchronize()
            walls["forward"].append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            loss.backward()
            torch.cuda.synchronize()
            walls["backward"].append((time.perf_counter() - started) * 1e3)
            model.zero_grad(set_to_none=True)
        loss, _, forward_kernel = _kernel_ms(lambda: model(**batch).loss)
        _, _, backward_kernel = _kernel_ms(loss.backward)
        model.zero_grad(set_to_none=True)
        unpatch_model(model)
        median = {k: statistics.median(v[2:]) for k, v in walls.items()}
        print(f"| {size} | {name} | {median['forward']:.1f} | {forward_kernel:.1f} | {median['backward']:.1f} | "
              f"{backward_kernel:.1f} |", flush=True)


def _frames(stack: str):
    """py-spy raw frames, outermost first: 'function (file:line)'."""
    return [f for f in stack.split(";") if f]


def summarize(path: str, top: int):
    self_samples, inclusive, total = Counter(), Counter(), 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit() or not _frames(stack):
            continue
        frames, n = _frames(stack), int(count)
        total += n
        self_samples[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    for title, counter in (("self", self_samples), ("inclusive", inclusive)):
        print(f"\n## {title} (share of {total} samples)\n")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:5.1f}%  {frame}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="4x512", help="batch x seq (--phases: comma-separated)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variant", default="patched", choices=["patched", "stock"])
    parser.add_argument("--summarize", default=None, help="a py-spy raw stacks file to summarize instead")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--phases", action="store_true", help="time forward and backward apart")
    parser.add_argument("--cprofile", action="store_true", help="cProfile of the training forward")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.top)
    elif args.phases:
        phases(args.size, args.steps)
    elif args.cprofile:
        cprofile_forward(args.size, args.steps, args.top)
    else:
        run(args.size, args.steps, args.variant)


if __name__ == "__main__":
    main()

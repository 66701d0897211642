"""Where the host time of one Triton launch goes (GPU machine): cProfile over back-to-back launches of a
small kernel, next to one aten op.

  python bench/launch_overhead.py > $OUT/launch_overhead.txt
"""

import cProfile
import io
import pstats
import time

import torch

from qlora_fast.kernels.rms_norm import rms_norm_forward


def per_call_us(fn, calls=2000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def main():
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    launch = lambda: rms_norm_forward(x, w, 1e-6)
    print(f"torch.add: {per_call_us(lambda: torch.add(x, 1)):.1f} us per call")
    print(f"rms_norm_forward: {per_call_us(launch):.1f} us per call")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        launch()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main()

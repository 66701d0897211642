"""Where the host time of one Triton launch goes (GPU machine): cProfile over back-to-back launches of a
small kernel (bench/kernels.py's "host" section times a launch against an aten op).

  python bench/launch_overhead.py > $OUT/launch_overhead.txt
"""

import cProfile
import io
import pstats

import torch

from qlora_fast.kernels.rms_norm import rms_norm_forward


def main():
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    launch = lambda: rms_norm_forward(x, w, 1e-6)
    for _ in range(20):  # compile and warm up outside the profile
        launch()
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

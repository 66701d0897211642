"""Launching a compiled Triton kernel again without JITFunction.run's per-call work.

`kernel[grid](*args)` binds and specializes every argument, builds a cache key and checks the kernel's
globals on each call: ~15 us of host time on the GPU machines, where a small weight's dequantize takes a
few microseconds of GPU time. A `DirectLaunch` makes the first call of each `key` through Triton (which
compiles, caches and launches), keeps the CompiledKernel it returns, and later calls hand the arguments
straight to that kernel's launcher, in the order JITFunction.run passes them. The caller's key must
cover everything Triton specializes on for these arguments (dtypes, constexprs, divisibility by 16 of
the integers). Under the interpreter, or with Triton launch hooks set (profilers), every call goes
through Triton.
"""

import torch
import triton

from ._utils import INTERPRETING


def _launch_hooks_set() -> bool:
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    return runtime is None or runtime.launch_enter_hook is not None or runtime.launch_exit_hook is not None


class DirectLaunch:
    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}  # key -> (launcher, function, packed metadata, names of constexpr args)
        self.enabled = not INTERPRETING

    def __call__(self, key, device: torch.device, grid: tuple, args: tuple, constexprs: dict, options: dict):
        """kernel[grid](*args, **constexprs, **options) on `device`; `args` are the leading positional
        arguments, the constexprs come after them in the kernel's signature."""
        entry = self.compiled.get(key) if self.enabled else None
        if entry is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            if self.enabled and compiled is not None and not _launch_hooks_set():
                names = self.kernel.arg_names[len(args):]
                self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, names)
            return
        run, function, metadata, names = entry
        stream = torch._C._cuda_getCurrentRawStream(device.index if device.index is not None
                                                   else torch.cuda.current_device())
        grid = grid + (1,) * (3 - len(grid))
        run(*grid, stream, function, metadata, None, None, None, *args, *(constexprs[n] for n in names))

import inspect
import os

import torch
import triton
import triton.language as tl

try:
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
except ImportError:  # older Triton: no knobs module, and a launcher layout _c_launch does not take
    _knobs = _HookChain = None


# True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1). Triton reads the
# switch when a kernel is defined, so it is read once, here, as the kernels are imported: an environment
# lookup per launch cost a few microseconds of host time each.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The interpreter pays per program, not per element: the row and elementwise kernels give a program this
# many elements there (one row or 1024 elements on the GPU). One-row programs made a tiny CPU training
# step 27 s instead of 1 s.
INTERPRETER_TILE = 2**16


def tuning_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over; the interpreter gets only the first, since it would time them all."""
    return configs[:1] if INTERPRETING else configs


# Launch arithmetic on the host. Triton's own cdiv and next_power_of_2 are constexpr functions, which
# unwrap their arguments on every call: ~14 us each on the CPU machine, ~750 calls in a Llama-8B step.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Relaunch:
    """A compiled Triton kernel launched again with the specialization of its first launch, every argument
    but the output fixed, pointers passed as addresses. Per call this skips Triton's binding (which
    specializes each argument) and the launcher's data_ptr() call and driver pointer check per tensor:
    ~2 us of host time per tensor argument on the lent H200's host. Where the launcher has the layout
    `_c_launch` knows and no launch hook is set, it also skips the runner's Python: the launch-metadata
    dict, the two hook chains the C launcher would call back, and the device and stream lookups through
    Triton's driver. The output must be 16-byte aligned, as the first launch's was (Triton specializes on
    it); the fixed tensors must outlive the Relaunch."""

    def __init__(self, compiled, grid: tuple, args: tuple, out_position: int):
        address = lambda a: a.data_ptr() if isinstance(a, torch.Tensor) else a
        self.device = current_device()
        self._grid = (*grid, 1, 1)[:3]  # the compiled kernel's runner reads all three axes
        self._runner = compiled[self._grid]
        self._head = tuple(address(a) for a in args[:out_position])
        self._tail = tuple(address(a) for a in args[out_position + 1:])
        launch = _c_launch(compiled)
        if launch is not None:
            self._c_launch, self._c_head = launch[0], (*launch[1:], *self._head)
        else:
            self._c_launch = None

    @classmethod
    def of(cls, compiled, grid: tuple, args: tuple, out_position: int) -> "Relaunch | None":
        """The Relaunch of a launch's returned kernel; None under the interpreter (no compiled kernel) or
        for an output not 16-byte aligned."""
        if compiled is None or INTERPRETING or args[out_position].data_ptr() % 16:
            return None
        return cls(compiled, grid, args, out_position)

    def takes(self, out: torch.Tensor) -> bool:
        return out.data_ptr() % 16 == 0 and current_device() == self.device

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if self._c_launch is not None and not launch_hooks_set():
            self._c_launch(*self._grid, current_stream(self.device), *self._c_head, out.data_ptr(), *self._tail)
        else:
            self._runner(*self._head, out.data_ptr(), *self._tail)
        return out


def current_device() -> int:
    """torch.cuda.current_device() without its lazy-initialization check: CUDA is initialized once a
    kernel was launched."""
    return torch._C._cuda_getDevice()


def current_stream(device: int) -> int:
    """The current CUDA stream's handle on `device`, as Triton's runner reads it."""
    return torch._C._cuda_getCurrentRawStream(device)


def launch_hooks_set() -> bool:
    """Whether a launch hook (a profiler's, Proton's) is set: then every launch goes through Triton's runner,
    which calls it. Asked per launch, so spelled without a generator."""
    if _knobs is None:
        return True
    enter, exit_ = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
    return not ((enter is None or (type(enter) is _HookChain and not enter.calls))
                and (exit_ is None or (type(exit_) is _HookChain and not exit_.calls)))


# Triton 3.5/3.6's CUDA launcher: __call__(gridX, gridY, gridZ, stream, function, *args) hands its C `launch`
# (gridX, gridY, gridZ, stream, function, cooperative_grid, pdl, global_scratch, profile_scratch, *args),
# where args = (packed kernel metadata, launch metadata, enter hook, exit hook, *the kernel's arguments).
_LAUNCHER_CALL = ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]


def _c_launch(compiled) -> tuple | None:
    """(the C launch function of `compiled`'s launcher, the arguments it takes between the stream and the
    kernel's own), or None where the launcher has another layout or needs scratch memory allocated per
    launch: those launch through Triton's runner."""
    launcher = getattr(compiled, "run", None)
    try:
        params = list(inspect.signature(type(launcher).__call__).parameters) if launcher is not None else []
    except (TypeError, ValueError):
        return None
    needed = ("launch", "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "profile_scratch_size")
    if params != _LAUNCHER_CALL or _knobs is None or not all(hasattr(launcher, n) for n in needed):
        return None
    if launcher.global_scratch_size or launcher.profile_scratch_size:
        return None
    return (launcher.launch, compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl,
            None, None, compiled.packed_metadata, None, None, None)


@triton.jit
def round_fp32_to(x, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr):
    """fp32 -> `dtype`, round to nearest even. SOFTWARE_RTNE spells the bf16 rounding out, because
    Triton's CPU interpreter truncates fp32 -> bf16 where the GPU (and bitsandbytes) round."""
    if SOFTWARE_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def tanh(z):
    """tanh in fp32 as (1 - e) / (1 + e) with e = exp(-2|z|) <= 1: no overflow, exact limits at both ends
    (CUDA's tanhf may differ in the last bit)."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)

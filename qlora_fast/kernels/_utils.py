import os

import triton
import triton.language as tl


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

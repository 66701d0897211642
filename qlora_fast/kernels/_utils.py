import os

import triton


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

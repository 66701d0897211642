import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over; the interpreter gets only the first, since it would time them all."""
    return configs[:1] if interpreting() else configs

"""Triton kernels: one kernel per module, each with its launcher and autotune configs."""

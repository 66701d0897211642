"""Autograd-level operations built on the kernels."""

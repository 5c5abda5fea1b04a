"""Triton kernels of rgkern and the host functions that launch them (installed as rgkern.kernels)."""

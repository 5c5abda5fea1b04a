"""The accumulator dtype rule, in one place.

Log-dets (per-row and per-sample sums) and the other reductions of the ops accumulate in
float64 for float64 data and in float32 for everything else (float32, float16, bfloat16).
The reference ops, the Triton kernels (:mod:`rgkern.kernels`), the model, the locality
layer and inpainting all ask :func:`accumulator_dtype`. This module imports nothing from
rgkern, so the kernels may use it without depending on the rest of the package.
"""
import torch

__all__ = ["accumulator_dtype"]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float64 for float64 data, float32 for everything else (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32

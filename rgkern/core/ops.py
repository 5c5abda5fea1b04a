"""Backend dispatch for the per-sublayer ops.

``backend="torch"`` runs :mod:`rgkern.core.reference`; ``"triton"`` the Triton kernels
behind their autograd Functions (:mod:`rgkern.core.functions`); ``"auto"`` the kernels on
CUDA tensors and the reference elsewhere. Names, shapes and conventions are those of
:mod:`rgkern.core.reference`.
"""
from __future__ import annotations

import torch

from . import reference
from .errors import InputError

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "check_backend",
    "resolve_backend",
    "gather_patches",
    "scatter_patches",
    "affine_coupling",
    "coupling_half_step",
    "sublayer_couplings",
]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for ``tensor``."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not _interpreter_requested():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got a tensor on {tensor.device}; move the model "
            "and data to a GPU, use backend='auto' or 'torch', or set TRITON_INTERPRET=1 before "
            "importing triton to run the kernels in Triton's CPU interpreter"
        )
    return backend


def _interpreter_requested() -> bool:
    # The kernels' own rule (imported here, not at the top, so that importing rgkern does
    # not import triton).
    from ..kernels.launch import interpreter_requested

    return interpreter_requested()


def _kernels():
    from . import functions

    return functions


def gather_patches(x, row_index, backend="torch"):
    if backend == "triton":
        return _kernels().gather_patches(x, row_index)
    return reference.gather_patches(x, row_index)


def scatter_patches(x, rows, row_index, backend="torch"):
    if backend == "triton":
        return _kernels().scatter_patches(x, rows, row_index)
    return reference.scatter_patches(x, rows, row_index)


def affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, inverse=False, backend="torch"):
    if backend == "triton":
        return _kernels().affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, inverse)
    return reference.affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, inverse)


def coupling_half_step(x, mask, s_scale, t_scale, weights, inverse=False, backend="torch"):
    if backend == "triton":
        return _kernels().coupling_half_step(x, mask, s_scale, t_scale, weights, inverse)
    return reference.coupling_half_step(x, mask, s_scale, t_scale, weights, inverse)


def sublayer_couplings(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared=False, inverse=False,
                       recompute=False, backend="torch"):
    if backend == "triton":
        return _kernels().sublayer_couplings(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared,
                                             inverse, recompute)
    return reference.sublayer_couplings(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared,
                                        inverse, recompute)

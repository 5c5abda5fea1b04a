"""Backend dispatch for the per-sublayer ops.

Each op has two implementations, with the same names, shapes and conventions:

======================  ==============================================  ==========================================
op                      ``backend="torch"``                             ``backend="triton"``
======================  ==============================================  ==========================================
``gather_patches``      :func:`rgkern.core.reference.gather_patches`    :func:`rgkern.kernels.patches.gather_patches`
``scatter_patches``     :func:`rgkern.core.reference.scatter_patches`   :func:`rgkern.kernels.patches.scatter_patches`
``coupling_half_step``  :func:`rgkern.core.reference.coupling_half_step`  :func:`rgkern.kernels.coupling.coupling_half_step`
``sublayer_couplings``  :func:`rgkern.core.reference.sublayer_couplings`  :func:`rgkern.kernels.coupling.sublayer_couplings`
======================  ==============================================  ==========================================

``"auto"`` means the kernels on CUDA tensors and the reference elsewhere
(:func:`resolve_backend`). The kernel modules are imported on first use, inside each
function below (importing them imports triton and registers the operators, about 1.5 s
that ``import rgkern`` does not pay). Whether the kernels can run on a device is decided by
one rule, :func:`rgkern.kernels.runtime.triton_can_run`, re-exported here.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..kernels.runtime import require_triton, triton_can_run
from . import reference
from .errors import InputError

if TYPE_CHECKING:
    from ..kernels.coupling.weights import HalfStepWeights

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "check_backend",
    "resolve_backend",
    "triton_can_run",
    "require_triton",
    "gather_patches",
    "scatter_patches",
    "coupling_half_step",
    "sublayer_couplings",
    "watch_kernel_launches",
]


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for ``tensor``; ``"triton"`` where the
    kernels cannot run on its device is refused (:func:`require_triton`)."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton":
        require_triton(tensor.device, "backend='triton'")
    return backend


def gather_patches(x: torch.Tensor, row_index: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        from ..kernels.patches import gather_patches as kernel_gather_patches

        return kernel_gather_patches(x, row_index)
    return reference.gather_patches(x, row_index)


def scatter_patches(x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        from ..kernels.patches import scatter_patches as kernel_scatter_patches

        return kernel_scatter_patches(x, rows, row_index)
    return reference.scatter_patches(x, rows, row_index)


def _weights_in(weights, dtype: torch.dtype | None):
    """``weights`` (a ``HalfStepWeights``) with its matrices ``w_*`` in ``dtype`` (unchanged for None)."""
    if dtype is None:
        return weights
    return type(weights)(*(None if t is None else t.to(dtype) if name.startswith("w_") else t
                           for name, t in zip(weights._fields, weights)))


def coupling_half_step(x: torch.Tensor, mask: torch.Tensor, s_scale: torch.Tensor, t_scale: torch.Tensor,
                       weights: HalfStepWeights, inverse: bool = False, backend: str = "torch",
                       compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_dtype``: the matmuls' dtype (the autocast dtype); the kernels cast the weights
    as they load them, the reference casts them first."""
    if backend == "triton":
        from ..kernels.coupling import coupling_half_step as kernel_coupling_half_step

        return kernel_coupling_half_step(x, mask, s_scale, t_scale, weights, inverse, compute_dtype)
    return reference.coupling_half_step(x, mask, s_scale, t_scale, _weights_in(weights, compute_dtype), inverse)


def sublayer_couplings(images: torch.Tensor, row_index: torch.Tensor, mask: torch.Tensor, flipped_mask: torch.Tensor,
                       s_scale: torch.Tensor, t_scale: torch.Tensor, weights: HalfStepWeights, shared: bool = False,
                       inverse: bool = False, recompute: bool = False, backend: str = "torch",
                       compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_dtype`` as for :func:`coupling_half_step`."""
    if backend == "triton":
        from ..kernels.coupling import sublayer_couplings as kernel_sublayer_couplings

        return kernel_sublayer_couplings(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared,
                                         inverse, recompute, compute_dtype)
    return reference.sublayer_couplings(images, row_index, mask, flipped_mask, s_scale, t_scale,
                                        _weights_in(weights, compute_dtype), shared, inverse, recompute)


@contextlib.contextmanager
def watch_kernel_launches(watcher: Callable, run: bool = True) -> Iterator[None]:
    """Inside this, every Triton kernel launch of the kernel ops runs inside
    ``watcher(kernel, args, kwargs)`` (a context manager; :func:`rgkern.kernels.launch.watch_launches`);
    with ``run`` False the launches are watched but not run."""
    from ..kernels.launch import record_only, watch_launches

    with watch_launches(watcher), (contextlib.nullcontext() if run else record_only()):
        yield

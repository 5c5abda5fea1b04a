"""The patch gather and scatter ops: a sublayer's patches as coupling rows and back.

* :mod:`.gather`: ``gather_patches_kernel`` and its host functions;
* :mod:`.scatter`: ``scatter_patches_kernel``, ``scatter_patches_backward_kernel`` and theirs;
* :mod:`.function`: the autograd Functions, the ``rgkern::`` operators and the public
  :func:`gather_patches` / :func:`scatter_patches` (reference: :mod:`rgkern.core.reference`).
"""
from .function import GatherPatchesFunction, ScatterPatchesFunction, gather_patches, scatter_patches
from .gather import gather_patches_backward, gather_patches_forward, gather_patches_kernel
from .scatter import scatter_patches_backward, scatter_patches_backward_kernel, scatter_patches_forward, scatter_patches_kernel

__all__ = [
    "gather_patches",
    "scatter_patches",
    "GatherPatchesFunction",
    "ScatterPatchesFunction",
    "gather_patches_kernel",
    "gather_patches_forward",
    "gather_patches_backward",
    "scatter_patches_kernel",
    "scatter_patches_backward_kernel",
    "scatter_patches_forward",
    "scatter_patches_backward",
]

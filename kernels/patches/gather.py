"""Gather the patches of one sublayer into coupling rows: the kernel and its host functions.

``gather_patches_forward(x, row_index)`` reads image ``(B, C, L, L)`` into rows
``(B*P, D)`` through the ``(P, D)`` index table of :meth:`rgkern.Geometry.row_index` (or
any subset of its rows, as the incremental encoder passes): periodic wrap, dilation and
stride are all in the table, so the kernel is a plain indexed load with no Python loop
over patches. ``gather_patches_backward`` stores the row gradients into a zero image:
patches of one sublayer do not overlap, so a plain store is the scatter-add.
"""
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from .scatter import launch_patch_kernel, patch_block, scatter_rows_into

__all__ = ["gather_patches_kernel", "gather_patches_forward", "gather_patches_backward"]


@triton.jit
def gather_patches_kernel(
    image_ptr,
    row_index_ptr,
    rows_ptr,
    n_rows,
    num_patches,
    image_numel,
    DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """``rows[b*P + p, d] = image[b].flat[row_index[p, d]]`` for a block of rows.

    image: ``(B, image_numel)``; row_index: ``(P, DIM)`` int64/int32; rows: ``(n_rows, DIM)``
    of the image dtype, every element written. An index outside ``[0, image_numel)`` reads
    nothing and yields NaN.
    """
    row, col, live, sample, index = patch_block(row_index_ptr, n_rows, num_patches, DIM, BLOCK_ROWS, BLOCK_DIM)
    in_image = live & (index >= 0) & (index < image_numel)
    values = tl.load(image_ptr + sample[:, None] * image_numel + index, mask=in_image, other=float("nan"))
    tl.store(rows_ptr + row[:, None] * DIM + col[None, :], values, mask=live)


def gather_patches_forward(x: torch.Tensor, row_index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Patch rows of ``x`` at ``row_index``.

    Args:
        x: image ``(B, C, L, L)``, contiguous, float16/bfloat16/float32/float64.
        row_index: ``(P, D)`` int64 (or int32), contiguous, on ``x``'s device.
        out: optional ``(B*P, D)`` buffer of ``x``'s dtype (tests pass a NaN-filled one).
    Returns:
        rows ``(B*P, D)``, dtype of ``x``; patch ``p`` of sample ``b`` at row ``b*P + p``.
    """
    batch = x.shape[0]
    num_patches, dim = row_index.shape
    n_rows = batch * num_patches
    if out is None:
        out = torch.empty((n_rows, dim), dtype=x.dtype, device=x.device)
    if n_rows > 0:
        launch_patch_kernel(gather_patches_kernel, (x, row_index, out), n_rows, row_index, math.prod(x.shape[1:]))
    return out


def gather_patches_backward(
    grad_rows: torch.Tensor, row_index: torch.Tensor, image_shape: Sequence[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of :func:`gather_patches_forward` wrt the image.

    Args:
        grad_rows: ``(B*P, D)`` contiguous.
        row_index: ``(P, D)`` as in the forward.
        image_shape: ``(B, C, L, L)`` of the forward's ``x``.
        out: optional image-shaped buffer; it is zeroed first.
    Returns:
        ``(B, C, L, L)`` of ``grad_rows``' dtype: the row gradients at their pixels, zero
        where no patch reads.
    """
    if out is None:
        out = torch.zeros(tuple(image_shape), dtype=grad_rows.dtype, device=grad_rows.device)
    else:
        out.zero_()
    return scatter_rows_into(out, grad_rows, row_index)

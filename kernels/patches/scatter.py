"""Scatter coupling rows back into an image: the kernel and its host functions.

``scatter_patches_forward(x, rows, row_index)`` returns a copy of ``x`` with the patches
of one sublayer replaced by ``rows`` (pixels no patch covers keep their value from ``x``);
``scatter_patches_backward(grad_out, row_index)`` returns the gradients wrt ``x`` and
``rows``. The same store kernel is the backward of :mod:`.gather_patches`.

``row_index`` is a ``(P, D)`` table of flat indices into one ``(C, L, L)`` image (from
:meth:`rgkern.Geometry.row_index`, or any subset of its rows); row ``b*P + p`` of ``rows``
is patch ``p`` of sample ``b``. Patches of one sublayer do not overlap, so every image
element is written by at most one row and plain stores (no atomics) are exact. Index
values outside ``[0, C*L*L)`` are masked out (never touch memory); they are not checked on
the host because that would need a device synchronisation.
"""
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..launch import GPU_TILE_ELEMENTS, launch_kernel, row_launch_shape

__all__ = [
    "patch_block",
    "launch_patch_kernel",
    "scatter_patches_kernel",
    "scatter_patches_backward_kernel",
    "scatter_patches_forward",
    "scatter_patches_backward",
    "scatter_rows_into",
    "TILE_ELEMENTS",
]

# Elements of a patch kernel's tile on a GPU. Beside the values a tile holds their int64 image
# indices, and a scatter moves both through a layout conversion before its store; at 2,048
# elements ptxas spills 4-8 bytes per thread in a few specialisations (Triton 3.6 and 3.9,
# sm_80 and sm_90), at 1,024 in none (scripts/compile_kernels.py). These kernels only move
# memory: twice the programs also fill a GPU at half the batch.
TILE_ELEMENTS = GPU_TILE_ELEMENTS // 2


@triton.jit
def patch_block(row_index_ptr, n_rows, num_patches, DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr):
    """The block of rows this program handles, for every patch kernel (gather, scatter, backward).

    Returns ``row`` ``(BLOCK_ROWS,)`` int64 (global row ``b*P + p``), ``col``
    ``(BLOCK_DIM,)``, ``live`` ``(BLOCK_ROWS, BLOCK_DIM)`` (inside ``n_rows`` and ``DIM``),
    ``sample`` ``(BLOCK_ROWS,)`` (``b``) and ``index`` ``(BLOCK_ROWS, BLOCK_DIM)`` int64:
    ``row_index[p, d]``, 0 where not live.
    """
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_DIM)
    live = (row < n_rows)[:, None] & (col < DIM)[None, :]
    sample = row // num_patches
    patch = row - sample * num_patches
    index = tl.load(row_index_ptr + patch[:, None] * DIM + col[None, :], mask=live, other=0).to(tl.int64)
    return row, col, live, sample, index


def launch_patch_kernel(kernel: object, tensors: Sequence[torch.Tensor], n_rows: int, row_index: torch.Tensor, image_numel: int) -> None:
    """Launch a patch kernel over ``n_rows`` rows: ``kernel(*tensors, n_rows, P, image_numel, DIM=D, ...)``.

    ``row_index`` is the ``(P, D)`` table; the block sizes and the grid come from
    :func:`~rgkern.kernels.launch.row_launch_shape` with tiles of ``TILE_ELEMENTS``. The
    caller skips empty launches.
    """
    num_patches, dim = row_index.shape
    width, block_rows, programs = row_launch_shape(n_rows, dim, TILE_ELEMENTS)
    launch_kernel(
        kernel,
        (programs,),
        *tensors,
        n_rows,
        num_patches,
        image_numel,
        DIM=dim,
        BLOCK_ROWS=block_rows,
        BLOCK_DIM=width,
    )


@triton.jit
def scatter_patches_kernel(
    rows_ptr,
    row_index_ptr,
    image_ptr,
    n_rows,
    num_patches,
    image_numel,
    DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """``image[b].flat[row_index[p, d]] = rows[b*P + p, d]`` for a block of rows.

    rows: ``(n_rows, DIM)``; row_index: ``(P, DIM)`` int64/int32; image: ``(B, image_numel)``,
    same dtype as rows. Writes only the indexed image elements.
    """
    row, col, live, sample, index = patch_block(row_index_ptr, n_rows, num_patches, DIM, BLOCK_ROWS, BLOCK_DIM)
    live = live & (index >= 0) & (index < image_numel)
    values = tl.load(rows_ptr + row[:, None] * DIM + col[None, :], mask=live)
    tl.store(image_ptr + sample[:, None] * image_numel + index, values, mask=live)


@triton.jit
def scatter_patches_backward_kernel(
    grad_out_ptr,
    row_index_ptr,
    grad_rows_ptr,
    grad_image_ptr,
    n_rows,
    num_patches,
    image_numel,
    DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """Backward of the scatter for a block of rows.

    ``grad_rows[b*P + p, d] = grad_out[b].flat[i]`` and ``grad_image[b].flat[i] = 0`` with
    ``i = row_index[p, d]``. ``grad_image`` must already hold a copy of ``grad_out`` (the
    gradient of the elements no patch covers passes straight through); it is a separate
    buffer, so the reads of ``grad_out`` never see the zeros.
    """
    row, col, live, sample, index = patch_block(row_index_ptr, n_rows, num_patches, DIM, BLOCK_ROWS, BLOCK_DIM)
    in_image = live & (index >= 0) & (index < image_numel)
    image_offset = sample[:, None] * image_numel + index
    grad = tl.load(grad_out_ptr + image_offset, mask=in_image, other=0)
    tl.store(grad_rows_ptr + row[:, None] * DIM + col[None, :], grad, mask=live)
    tl.store(grad_image_ptr + image_offset, tl.zeros_like(grad), mask=in_image)


def scatter_rows_into(image: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Store ``rows`` ``(B*P, D)`` into ``image`` ``(B, ...)`` in place at ``row_index`` ``(P, D)``.

    All three contiguous and on one device; ``image`` and ``rows`` of one dtype. Returns ``image``.
    """
    n_rows = rows.shape[0]
    if n_rows > 0 and row_index.shape[0] > 0:
        launch_patch_kernel(scatter_patches_kernel, (rows, row_index, image), n_rows, row_index, math.prod(image.shape[1:]))
    return image


def scatter_patches_forward(
    x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy of ``x`` with the patches at ``row_index`` replaced by ``rows``.

    Args:
        x: image ``(B, C, L, L)``, contiguous, float16/bfloat16/float32/float64.
        rows: ``(B*P, D)`` contiguous, dtype of ``x``.
        row_index: ``(P, D)`` int64 (or int32) contiguous, flat indices into one image.
        out: optional ``(B, C, L, L)`` buffer of ``x``'s dtype to write into (tests pass a
            NaN-filled one); allocated when None.
    Returns:
        ``(B, C, L, L)``, dtype of ``x``: ``x`` copied, then the rows stored.
    """
    if out is None:
        out = x.clone()
    else:
        out.copy_(x)
    return scatter_rows_into(out, rows, row_index)


def scatter_patches_backward(
    grad_out: torch.Tensor, row_index: torch.Tensor, out: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`scatter_patches_forward` wrt ``x`` and ``rows``.

    Args:
        grad_out: ``(B, C, L, L)`` contiguous.
        row_index: ``(P, D)`` as in the forward.
        out: optional ``(grad_x, grad_rows)`` buffers (``(B, C, L, L)``, ``(B*P, D)``).
    Returns:
        ``grad_x`` ``(B, C, L, L)`` (``grad_out`` with the covered elements zeroed) and
        ``grad_rows`` ``(B*P, D)`` (``grad_out`` gathered at the patches), dtype of ``grad_out``.
    """
    batch = grad_out.shape[0]
    num_patches, dim = row_index.shape
    n_rows = batch * num_patches
    if out is None:
        grad_x = grad_out.clone()
        grad_rows = torch.empty((n_rows, dim), dtype=grad_out.dtype, device=grad_out.device)
    else:
        grad_x, grad_rows = out
        grad_x.copy_(grad_out)
    if n_rows > 0:
        launch_patch_kernel(
            scatter_patches_backward_kernel, (grad_out, row_index, grad_rows, grad_x), n_rows, row_index,
            math.prod(grad_out.shape[1:]),
        )
    return grad_x, grad_rows

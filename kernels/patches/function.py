"""The patch gather and scatter ops: autograd Functions, operators and the public functions.

``gather_patches(x, row_index) -> rows (B*P, D)`` and ``scatter_patches(x, rows, row_index)
-> image (B, C, L, L)``, with the signatures and conventions of
:mod:`rgkern.core.reference`. The public functions check their inputs
(:mod:`rgkern.kernels.checks`); the Functions call the host functions of :mod:`.gather` and
:mod:`.scatter` through their :class:`~rgkern.kernels.operator.Operator`\\ s.
"""
import torch
from torch.autograd.function import once_differentiable

from rgkern.core.errors import InputError

from ..checks import FLOAT_DTYPES, check_image, check_row_index, check_same, check_tensor
from ..operator import Operator
from .gather import gather_patches_backward, gather_patches_forward
from .scatter import scatter_patches_backward, scatter_patches_forward

__all__ = ["gather_patches", "scatter_patches", "GatherPatchesFunction", "ScatterPatchesFunction"]

_TENSOR = torch.Tensor


def _rows_like(x: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0] * row_index.shape[0], row_index.shape[1]))


gather_op = Operator(
    "gather_patches", gather_patches_forward, [("x", _TENSOR), ("row_index", _TENSOR)], _TENSOR,
    fake=_rows_like,
)
gather_backward_op = Operator(
    "gather_patches_backward", gather_patches_backward,
    [("grad_rows", _TENSOR), ("row_index", _TENSOR), ("image_shape", list[int])], _TENSOR,
    fake=lambda grad_rows, row_index, image_shape: grad_rows.new_empty(tuple(image_shape)),
)
scatter_op = Operator(
    "scatter_patches", scatter_patches_forward, [("x", _TENSOR), ("rows", _TENSOR), ("row_index", _TENSOR)], _TENSOR,
    fake=lambda x, rows, row_index: torch.empty_like(x),
)
scatter_backward_op = Operator(
    "scatter_patches_backward", scatter_patches_backward, [("grad_out", _TENSOR), ("row_index", _TENSOR)],
    tuple[_TENSOR, _TENSOR],
    fake=lambda grad_out, row_index: (torch.empty_like(grad_out), _rows_like(grad_out, row_index)),
)


class GatherPatchesFunction(torch.autograd.Function):
    """rows = gather_patches(x, row_index); inputs contiguous and validated by the caller."""

    @staticmethod
    def forward(ctx, x, row_index):
        ctx.save_for_backward(row_index)
        ctx.image_shape = list(x.shape)
        return gather_op(x, row_index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        (row_index,) = ctx.saved_tensors
        return gather_backward_op(grad_rows.contiguous(), row_index, ctx.image_shape), None


class ScatterPatchesFunction(torch.autograd.Function):
    """image = scatter_patches(x, rows, row_index); inputs contiguous and validated by the caller."""

    @staticmethod
    def forward(ctx, x, rows, row_index):
        ctx.save_for_backward(row_index)
        return scatter_op(x, rows, row_index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (row_index,) = ctx.saved_tensors
        grad_x, grad_rows = scatter_backward_op(grad_out.contiguous(), row_index)
        return grad_x, grad_rows, None


def gather_patches(x: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`rgkern.core.reference.gather_patches`: ``(B, C, L, L) -> (B*P, D)``.

    ``row_index`` ``(P, D)`` (int64 or int32): flat indices into one ``(C, L, L)`` image,
    a whole sublayer table or any subset of its rows. Differentiable wrt ``x``.
    """
    x = check_image("x", x).contiguous()
    row_index = check_row_index(row_index, x).contiguous()
    return GatherPatchesFunction.apply(x, row_index)


def scatter_patches(x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`rgkern.core.reference.scatter_patches`: rows into a copy of ``x``.

    ``rows`` ``(B*P, D)`` of ``x``'s dtype; the patches of ``row_index`` must not overlap
    (true of every sublayer table and its subsets). Differentiable wrt ``x`` and ``rows``.
    """
    x = check_image("x", x).contiguous()
    check_tensor("rows", rows, FLOAT_DTYPES, "floating-point patch rows")
    check_same("x", x, "rows", rows)
    row_index = check_row_index(row_index, x).contiguous()
    expected = (x.shape[0] * row_index.shape[0], row_index.shape[1])
    if tuple(rows.shape) != expected:
        raise InputError(
            f"rows has shape {tuple(rows.shape)}, expected (B*P, D) = {expected} for x of shape "
            f"{tuple(x.shape)} and row_index of shape {tuple(row_index.shape)}"
        )
    return ScatterPatchesFunction.apply(x, rows.contiguous(), row_index)

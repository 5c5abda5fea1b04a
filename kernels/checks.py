"""Input checks of the kernel ops' public functions: one check, one message naming the value.

Every public op function (:func:`rgkern.kernels.patches.gather_patches` and the others) checks
its arguments here before its autograd Function runs; the Functions, host functions and
kernels below them trust their inputs.
"""
from typing import Sequence

import torch

from rgkern.core.errors import InputError, InputTypeError

from .runtime import require_triton

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "check_tensor",
    "check_same",
    "check_image",
    "check_rows",
    "check_row_index",
    "check_vectors",
    "check_half_step_weights",
    "check_stacked_weights",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value: object, dtypes: Sequence[torch.dtype], kind: str) -> torch.Tensor:
    """``value`` if it is a tensor of one of ``dtypes`` (``kind`` says what it should be)."""
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor ({kind}), got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise InputTypeError(f"{name} has dtype {value.dtype}; expected {kind}, one of {list(dtypes)}")
    return value


def check_same(reference_name: str, reference: torch.Tensor, name: str, value: torch.Tensor, dtype: bool = True) -> None:
    """``value`` on ``reference``'s device (and, with ``dtype``, of its dtype)."""
    if value.device != reference.device:
        raise InputError(
            f"{name} is on {value.device} but {reference_name} is on {reference.device}; put them on one device"
        )
    if dtype and value.dtype != reference.dtype:
        raise InputTypeError(
            f"{name} has dtype {value.dtype} but {reference_name} has dtype {reference.dtype}; convert one of them"
        )


def _check_kernel_input(name: str, x, kind: str, dims: int, layout: str) -> torch.Tensor:
    check_tensor(name, x, FLOAT_DTYPES, f"a floating-point {kind}")
    if x.dim() != dims:
        raise InputError(f"{name} must be {dims}-D {layout}, got shape {tuple(x.shape)}")
    require_triton(x.device, name)
    return x


def check_image(name: str, x: object) -> torch.Tensor:
    """A floating-point ``(B, C, L, L)`` tensor on a device the kernels run on."""
    return _check_kernel_input(name, x, "image", 4, "(B, C, L, L)")


def check_rows(name: str, x: object) -> torch.Tensor:
    """Floating-point patch rows ``(N, D)`` on a device the kernels run on."""
    return _check_kernel_input(name, x, "patch rows", 2, "patch rows (N, D)")


def check_row_index(row_index: object, x: torch.Tensor) -> torch.Tensor:
    """An integer ``(P, D)`` patch table on ``x``'s device."""
    check_tensor("row_index", row_index, INDEX_DTYPES, "an integer index table")
    if row_index.dim() != 2:
        raise InputError(f"row_index must be 2-D (P, D), got shape {tuple(row_index.shape)}")
    check_same("x", x, "row_index", row_index, dtype=False)
    return row_index


def check_vectors(reference_name: str, reference: torch.Tensor, vectors: dict, shape: tuple, constant: bool = False) -> None:
    """Each ``{name: value}`` a floating-point tensor of ``shape`` on ``reference``'s device; with
    ``constant`` (the coupling masks) one that needs no gradient."""
    expected = "(D,)" if len(shape) == 1 else "(pairs, D)"
    for name, value in vectors.items():
        check_tensor(name, value, FLOAT_DTYPES, "floating point")
        check_same(reference_name, reference, name, value, dtype=False)
        if tuple(value.shape) != tuple(shape):
            raise InputError(f"{name} has shape {tuple(value.shape)}, expected {expected} = {tuple(shape)}")
        if constant and value.requires_grad:
            raise InputError(f"{name} requires grad, but the coupling mask is a constant; pass {name}.detach()")


def check_half_step_weights(x: torch.Tensor, dim: int, weights: object, what: str = "weights",
                            compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """One half-step's :class:`~rgkern.kernels.coupling.weights.HalfStepWeights` for rows of
    width ``dim`` like ``x`` (dtypes, devices, shapes), computed in ``compute_dtype`` (the
    weights' by default); returns the compute dtype.

    The compute dtype is x's or a narrower float; the weights are in it or in x's (the kernels
    cast them as they load them); biases and slopes in the weights' dtype or x's.
    """
    from .coupling.weights import HalfStepWeights  # here: the coupling package imports this module

    if not isinstance(weights, HalfStepWeights):
        raise InputTypeError(f"{what} must be a HalfStepWeights, got {type(weights).__name__}")
    weight_dtype = weights.w_last.dtype
    compute = weight_dtype if compute_dtype is None else compute_dtype
    if compute not in FLOAT_DTYPES or compute.itemsize > x.dtype.itemsize:
        raise InputTypeError(f"the compute dtype is {compute}; expected x's dtype {x.dtype} or a narrower float")
    if weight_dtype not in (compute, x.dtype):
        raise InputTypeError(f"the weights have dtype {weight_dtype}; expected the compute dtype {compute} or x's {x.dtype}")
    vector_dtype = weights.b_last.dtype
    if vector_dtype not in (weight_dtype, x.dtype):
        raise InputTypeError(f"{what}.b_last has dtype {vector_dtype}; expected the weights' {weight_dtype} or x's {x.dtype}")
    expected = weights.expected_shapes(dim)
    for name in HalfStepWeights._fields:
        value = getattr(weights, name)
        if name not in expected:
            if value is not None:
                raise InputError(f"{what}.{name} must be None for this layout (w_first and w_mid present or absent with it)")
            continue
        wanted = weight_dtype if name.startswith("w_") else vector_dtype
        kind = "weights" if name.startswith("w_") else "biases and slopes"
        check_tensor(f"{what}.{name}", value, (wanted,), f"dtype {wanted}, as the other {kind}")
        check_same("x", x, f"{what}.{name}", value, dtype=False)
        if tuple(value.shape) != expected[name]:
            raise InputError(f"{what}.{name} has shape {tuple(value.shape)}, expected {expected[name]}")
    return compute


def check_stacked_weights(weights: object, pairs: int) -> None:
    """Every present tensor of ``weights`` (a ``HalfStepWeights``) carries a leading pair dimension of ``pairs``."""
    from .coupling.weights import HalfStepWeights  # here: the coupling package imports this module

    if not isinstance(weights, HalfStepWeights):
        raise InputTypeError(f"weights must be a HalfStepWeights, got {type(weights).__name__}")
    for name, value in zip(HalfStepWeights._fields, weights):
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != pairs):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"weights.{name} is {got}; expected a tensor with a leading pair dimension of {pairs}")

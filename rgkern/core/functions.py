"""The Triton kernel path of the per-sublayer ops: autograd Functions and torch.library ops.

Public functions with the signatures of :mod:`rgkern.core.reference` (``rgkern.core.ops``
calls them for ``backend="triton"``)::

    gather_patches(x, row_index)                                     -> rows (B*P, D)
    scatter_patches(x, rows, row_index)                              -> image (B, C, L, L)
    affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, inverse) -> (y (N, D), logdet (N,))
    coupling_half_step(x, mask, s_scale, t_scale, weights, inverse)  -> (y (N, D), logdet (N,))
    sublayer_couplings(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared, inverse)
                                                                     -> (images, logdet (B,))

They check their inputs (one check, one message naming the value), make them contiguous
and call thin ``torch.autograd.Function``\\ s (:class:`GatherPatchesFunction`,
:class:`ScatterPatchesFunction`, :class:`AffineCouplingFunction`,
:class:`CouplingHalfStepFunction`, :class:`SublayerCouplingsFunction`) whose forward and
backward only call the host functions in :mod:`rgkern.kernels`.

torch.library: the forward and backward computations are also registered as operators in
the ``rgkern`` namespace (``torch.ops.rgkern.gather_patches`` and so on, see
:data:`REGISTRATION`), with ``torch.library.triton_op`` where the installed torch has it
(torch.compile then sees and can inline the Triton kernels), and as opaque
``torch.library.custom_op``\\ s with fake (shape) functions when the kernels run in Triton's
CPU interpreter (``triton_op`` cannot trace interpreted kernels) or torch has no
``triton_op``. The Functions call the registered operators while ``torch.compile`` traces
them and the host functions directly in eager mode (no dispatcher overhead); both run the
same code. The registered operators are not differentiable by themselves: differentiate
through the public functions.
"""
import torch
from torch.autograd.function import once_differentiable

from ..kernels.launch import is_interpreted
from ..kernels.affine_coupling import affine_coupling_backward, affine_coupling_forward
from typing import Optional

from ..kernels.coupling import (
    HalfStepWeights,
    activation_shapes,
    coupling_half_step_backward,
    coupling_half_step_forward,
    pair_weights,
    sublayer_buffer_shapes,
    sublayer_couplings_backward,
    sublayer_couplings_forward,
)
from ..kernels.gather_patches import gather_patches_backward, gather_patches_forward, gather_patches_kernel
from ..kernels.scatter_patches import scatter_patches_backward, scatter_patches_forward
from .errors import InputError, InputTypeError
from .precision import accumulator_dtype

__all__ = [
    "gather_patches",
    "scatter_patches",
    "affine_coupling",
    "coupling_half_step",
    "sublayer_couplings",
    "GatherPatchesFunction",
    "ScatterPatchesFunction",
    "AffineCouplingFunction",
    "CouplingHalfStepFunction",
    "SublayerCouplingsFunction",
    "REGISTRATION",
    "NAMESPACE",
]

NAMESPACE = "rgkern"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)

# Decided when triton decorated the kernels (TRITON_INTERPRET at import time).
_INTERPRETED = is_interpreted(gather_patches_kernel)


# --------------------------------------------------------------------------- operator bodies
# Plain annotated functions (no ``from __future__ import annotations``: torch.library infers
# the operator schemas from these annotations).
def _gather_patches_op(x: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    return gather_patches_forward(x, row_index)


def _gather_patches_backward_op(grad_rows: torch.Tensor, row_index: torch.Tensor, image_shape: list[int]) -> torch.Tensor:
    return gather_patches_backward(grad_rows, row_index, image_shape)


def _scatter_patches_op(x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    return scatter_patches_forward(x, rows, row_index)


def _scatter_patches_backward_op(grad_out: torch.Tensor, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scatter_patches_backward(grad_out, row_index)


def _affine_coupling_op(
    x: torch.Tensor,
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    mask: torch.Tensor,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return affine_coupling_forward(x, s_raw, t_raw, s_scale, t_scale, mask, inverse)


def _affine_coupling_backward_op(
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    x: torch.Tensor,
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    mask: torch.Tensor,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return affine_coupling_backward(grad_y, grad_logdet, x, s_raw, t_raw, s_scale, t_scale, mask, inverse)


def _coupling_half_step_op(
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    w_first: Optional[torch.Tensor],
    b_first: Optional[torch.Tensor],
    slope_first: Optional[torch.Tensor],
    w_mid: Optional[torch.Tensor],
    b_mid: Optional[torch.Tensor],
    slope_mid: Optional[torch.Tensor],
    w_last: torch.Tensor,
    b_last: torch.Tensor,
    slope_last: torch.Tensor,
    inverse: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = HalfStepWeights(w_first, b_first, slope_first, w_mid, b_mid, slope_mid, w_last, b_last, slope_last)
    return coupling_half_step_forward(x, mask, s_scale, t_scale, weights, inverse, save)


def _coupling_half_step_backward_op(
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    w_first: Optional[torch.Tensor],
    b_first: Optional[torch.Tensor],
    slope_first: Optional[torch.Tensor],
    w_mid: Optional[torch.Tensor],
    b_mid: Optional[torch.Tensor],
    slope_mid: Optional[torch.Tensor],
    w_last: torch.Tensor,
    b_last: torch.Tensor,
    slope_last: torch.Tensor,
    inverse: bool,
    streams: torch.Tensor,
    hidden: torch.Tensor,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    """The gradients of x, s_scale, t_scale and the nine weights; an absent weight's is empty.

    The scale and slope gradients are slices of one reduction; an operator's outputs may not
    alias, so they are copied here (eager mode calls the host function, without the copies).
    """
    weights = HalfStepWeights(w_first, b_first, slope_first, w_mid, b_mid, slope_mid, w_last, b_last, slope_last)
    grad_x, grad_s, grad_t, grads = coupling_half_step_backward(
        grad_y, grad_logdet, x, mask, s_scale, t_scale, weights, inverse, streams, hidden
    )
    grads = [x.new_empty(0) if g is None else g.clone() if name.startswith("slope") else g
             for name, g in zip(HalfStepWeights._fields, grads)]
    return (grad_x, grad_s.clone(), grad_t.clone(), *grads)


def _sublayer_couplings_op(
    images: torch.Tensor,
    row_index: torch.Tensor,
    mask: torch.Tensor,
    flipped_mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    w_first: Optional[torch.Tensor],
    b_first: Optional[torch.Tensor],
    slope_first: Optional[torch.Tensor],
    w_mid: Optional[torch.Tensor],
    b_mid: Optional[torch.Tensor],
    slope_mid: Optional[torch.Tensor],
    w_last: torch.Tensor,
    b_last: torch.Tensor,
    slope_last: torch.Tensor,
    shared: bool,
    inverse: bool,
    keep_rows: bool,
    keep_activations: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = HalfStepWeights(w_first, b_first, slope_first, w_mid, b_mid, slope_mid, w_last, b_last, slope_last)
    return sublayer_couplings_forward(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared, inverse,
                                      keep_rows, keep_activations)


def _sublayer_couplings_backward_op(
    grad_out: torch.Tensor,
    grad_logdet: torch.Tensor,
    images: torch.Tensor,
    row_index: torch.Tensor,
    mask: torch.Tensor,
    flipped_mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    w_first: Optional[torch.Tensor],
    b_first: Optional[torch.Tensor],
    slope_first: Optional[torch.Tensor],
    w_mid: Optional[torch.Tensor],
    b_mid: Optional[torch.Tensor],
    slope_mid: Optional[torch.Tensor],
    w_last: torch.Tensor,
    b_last: torch.Tensor,
    slope_last: torch.Tensor,
    shared: bool,
    inverse: bool,
    rows: torch.Tensor,
    streams: torch.Tensor,
    hidden: torch.Tensor,
    recompute: bool,
    grad_images_needed: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    """The gradients of the images, the scales and the nine stacked weights (an absent one's is
    empty); views of one reduction are copied, as in :func:`_coupling_half_step_backward_op`."""
    weights = HalfStepWeights(w_first, b_first, slope_first, w_mid, b_mid, slope_mid, w_last, b_last, slope_last)
    grad_images, grad_s, grad_t, grads = sublayer_couplings_backward(
        grad_out, grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared, inverse,
        rows, streams, hidden, recompute, grad_images_needed,
    )
    grads = [images.new_empty(0) if g is None else g.clone() if name.startswith("slope") else g
             for name, g in zip(HalfStepWeights._fields, grads)]
    return (grad_images, grad_s.clone(), grad_t.clone(), *grads)


# Shape-only versions for the opaque custom_op registration (triton_op derives its own).
def _gather_patches_fake(x, row_index):
    return x.new_empty((x.shape[0] * row_index.shape[0], row_index.shape[1]))


def _gather_patches_backward_fake(grad_rows, row_index, image_shape):
    return grad_rows.new_empty(tuple(image_shape))


def _scatter_patches_fake(x, rows, row_index):
    return torch.empty_like(x)


def _scatter_patches_backward_fake(grad_out, row_index):
    rows = grad_out.new_empty((grad_out.shape[0] * row_index.shape[0], row_index.shape[1]))
    return torch.empty_like(grad_out), rows


def _affine_coupling_fake(x, s_raw, t_raw, s_scale, t_scale, mask, inverse):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=accumulator_dtype(x.dtype))


def _affine_coupling_backward_fake(grad_y, grad_logdet, x, s_raw, t_raw, s_scale, t_scale, mask, inverse):
    return (
        torch.empty_like(x),
        torch.empty_like(x),
        torch.empty_like(x),
        torch.empty_like(s_scale),
        torch.empty_like(t_scale),
    )


def _coupling_half_step_fake(x, mask, s_scale, t_scale, *rest):
    *weights, inverse, save = rest
    weights = HalfStepWeights(*weights)
    stream_shape, hidden_shape = activation_shapes(x.shape[0], x.shape[1], weights, save)
    compute = weights.w_last.dtype
    return (
        torch.empty_like(x),
        x.new_empty((x.shape[0],), dtype=accumulator_dtype(x.dtype)),
        x.new_empty(stream_shape, dtype=compute),
        x.new_empty(hidden_shape, dtype=compute),
    )


def _coupling_half_step_backward_fake(grad_y, grad_logdet, x, mask, s_scale, t_scale, *rest):
    weights = rest[:9]
    return (torch.empty_like(x), torch.empty_like(s_scale), torch.empty_like(t_scale),
            *(x.new_empty(0) if w is None else torch.empty_like(w) for w in weights))


def _sublayer_couplings_fake(images, row_index, mask, flipped_mask, s_scale, t_scale, *rest):
    *weights, shared, inverse, keep_rows, keep_activations = rest
    weights = HalfStepWeights(*weights)
    shapes = sublayer_buffer_shapes(images.shape[0], row_index.shape, s_scale.shape[0], weights, shared, keep_rows,
                                    keep_activations)
    compute = weights.w_last.dtype
    return (
        torch.empty_like(images),
        images.new_empty((images.shape[0],), dtype=accumulator_dtype(images.dtype)),
        images.new_empty(shapes[0]),
        images.new_empty(shapes[1], dtype=compute),
        images.new_empty(shapes[2], dtype=compute),
    )


def _sublayer_couplings_backward_fake(grad_out, grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale, *rest):
    weights = rest[:9]
    return (torch.empty_like(images), torch.empty_like(s_scale), torch.empty_like(t_scale),
            *(images.new_empty(0) if w is None else torch.empty_like(w) for w in weights))


_OPERATORS = {
    "gather_patches": (_gather_patches_op, _gather_patches_fake),
    "gather_patches_backward": (_gather_patches_backward_op, _gather_patches_backward_fake),
    "scatter_patches": (_scatter_patches_op, _scatter_patches_fake),
    "scatter_patches_backward": (_scatter_patches_backward_op, _scatter_patches_backward_fake),
    "affine_coupling": (_affine_coupling_op, _affine_coupling_fake),
    "affine_coupling_backward": (_affine_coupling_backward_op, _affine_coupling_backward_fake),
    "coupling_half_step": (_coupling_half_step_op, _coupling_half_step_fake),
    "coupling_half_step_backward": (_coupling_half_step_backward_op, _coupling_half_step_backward_fake),
    "sublayer_couplings": (_sublayer_couplings_op, _sublayer_couplings_fake),
    "sublayer_couplings_backward": (_sublayer_couplings_backward_op, _sublayer_couplings_backward_fake),
}


def _register(name: str, body, fake):
    """Register ``rgkern::name``; returns (how, the operator or None)."""
    qualified = f"{NAMESPACE}::{name}"
    library = torch.library
    try:
        if not _INTERPRETED and hasattr(library, "triton_op") and hasattr(library, "wrap_triton"):
            return "triton_op", library.triton_op(qualified, body, mutates_args=())
        if hasattr(library, "custom_op"):
            op = library.custom_op(qualified, body, mutates_args=())
            op.register_fake(fake)
            return "custom_op", op
        return "unregistered: this torch has neither torch.library.triton_op nor custom_op", None
    except Exception as error:  # e.g. registered twice after importlib.reload
        return f"unregistered: {type(error).__name__}: {error}", None


#: How each operator was registered: ``"triton_op"``, ``"custom_op"`` or ``"unregistered: why"``.
REGISTRATION: dict = {}
_REGISTERED_OPS: dict = {}
for _name, (_body, _fake) in _OPERATORS.items():
    REGISTRATION[_name], _op = _register(_name, _body, _fake)
    if _op is not None:
        _REGISTERED_OPS[_name] = _op
del _name, _body, _fake, _op


def _run(name: str, *args):
    """The registered operator while torch.compile traces, the host function otherwise."""
    if name in _REGISTERED_OPS and torch.compiler.is_compiling():
        return getattr(getattr(torch.ops, NAMESPACE), name)(*args)
    return _OPERATORS[name][0](*args)


# --------------------------------------------------------------------------- autograd Functions
class GatherPatchesFunction(torch.autograd.Function):
    """rows = gather_patches(x, row_index); inputs contiguous and validated by the caller."""

    @staticmethod
    def forward(ctx, x, row_index):
        ctx.save_for_backward(row_index)
        ctx.image_shape = list(x.shape)
        return _run("gather_patches", x, row_index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        (row_index,) = ctx.saved_tensors
        return _run("gather_patches_backward", grad_rows.contiguous(), row_index, ctx.image_shape), None


class ScatterPatchesFunction(torch.autograd.Function):
    """image = scatter_patches(x, rows, row_index); inputs contiguous and validated by the caller."""

    @staticmethod
    def forward(ctx, x, rows, row_index):
        ctx.save_for_backward(row_index)
        return _run("scatter_patches", x, rows, row_index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (row_index,) = ctx.saved_tensors
        grad_x, grad_rows = _run("scatter_patches_backward", grad_out.contiguous(), row_index)
        return grad_x, grad_rows, None


class AffineCouplingFunction(torch.autograd.Function):
    """(y, logdet) = affine_coupling(...); inputs contiguous and validated by the caller.

    Gradients flow to x, s_raw, t_raw, s_scale and t_scale; the mask is a constant.
    """

    @staticmethod
    def forward(ctx, x, s_raw, t_raw, s_scale, t_scale, mask, inverse):
        ctx.save_for_backward(x, s_raw, t_raw, s_scale, t_scale, mask)
        ctx.inverse = bool(inverse)
        return _run("affine_coupling", x, s_raw, t_raw, s_scale, t_scale, mask, bool(inverse))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        x, s_raw, t_raw, s_scale, t_scale, mask = ctx.saved_tensors
        grads = _run(
            "affine_coupling_backward",
            grad_y.contiguous(),
            grad_logdet.contiguous(),
            x,
            s_raw,
            t_raw,
            s_scale,
            t_scale,
            mask,
            ctx.inverse,
        )
        return (*grads, None, None)


class CouplingHalfStepFunction(torch.autograd.Function):
    """(y, logdet) = the fused half-step (:mod:`rgkern.kernels.coupling`).

    ``apply(x, mask, s_scale, t_scale, inverse, *weights)`` with the nine entries of a
    :class:`HalfStepWeights` (None where absent); inputs contiguous and validated by the
    caller. The forward keeps the activations only when some input needs a gradient.
    Gradients flow to x, the scales and every weight; the mask is a constant. Operators
    ``rgkern::coupling_half_step`` and ``rgkern::coupling_half_step_backward``.
    """

    @staticmethod
    def forward(ctx, x, mask, s_scale, t_scale, inverse, *weights):
        save = any(ctx.needs_input_grad)
        y, logdet, streams, hidden = _run("coupling_half_step", x, mask, s_scale, t_scale, *weights, bool(inverse), save)
        ctx.inverse = bool(inverse)
        ctx.absent = [w is None for w in weights]
        if save:
            ctx.save_for_backward(x, mask, s_scale, t_scale, streams, hidden, *weights)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        x, mask, s_scale, t_scale, streams, hidden, *weights = ctx.saved_tensors
        # grad_logdet is read as it is: a sum's gradient arrives expanded (stride 0).
        args = (grad_y.contiguous(), grad_logdet, x, mask, s_scale, t_scale)
        if torch.compiler.is_compiling():
            grad_x, grad_s_scale, grad_t_scale, *grad_weights = _run(
                "coupling_half_step_backward", *args, *weights, ctx.inverse, streams, hidden
            )
        else:
            grad_x, grad_s_scale, grad_t_scale, grad_weights = coupling_half_step_backward(
                *args, HalfStepWeights(*weights), ctx.inverse, streams, hidden
            )
        grad_weights = [None if absent else g for absent, g in zip(ctx.absent, grad_weights)]
        return (grad_x, None, grad_s_scale, grad_t_scale, None, *grad_weights)


class SublayerCouplingsFunction(torch.autograd.Function):
    """(images, logdet) = every coupling half-step of a sublayer on whole images
    (:func:`rgkern.kernels.coupling.sublayer_couplings_forward`: the patch gather and
    scatter fused into the first and last half-steps).

    ``apply(images, row_index, mask, flipped_mask, s_scale, t_scale, shared, inverse,
    recompute, *weights)`` with the nine entries of a :class:`HalfStepWeights` of stacked
    tensors (None where absent); inputs contiguous and validated by the caller. The forward
    keeps every half-step's input rows when some input needs a gradient, and their activations
    unless ``recompute`` (then the backward recomputes them, half-step by half-step).
    Gradients flow to the images, the scales and every weight. Operators
    ``rgkern::sublayer_couplings`` and ``rgkern::sublayer_couplings_backward``.
    """

    @staticmethod
    def forward(ctx, images, row_index, mask, flipped_mask, s_scale, t_scale, shared, inverse, recompute, *weights):
        needs = any(ctx.needs_input_grad)
        ctx.flags = (bool(shared), bool(inverse), bool(recompute))
        out, logdet, rows, streams, hidden = _run(
            "sublayer_couplings", images, row_index, mask, flipped_mask, s_scale, t_scale, *weights, bool(shared),
            bool(inverse), needs, needs and not recompute,
        )
        ctx.absent = [w is None for w in weights]
        if needs:
            if recompute:  # the forward's reused slots: the backward recomputes every half-step's
                streams = hidden = rows.new_empty((0,))
            ctx.save_for_backward(images, row_index, mask, flipped_mask, s_scale, t_scale, rows, streams, hidden, *weights)
        return out, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_logdet):
        images, row_index, mask, flipped_mask, s_scale, t_scale, rows, streams, hidden, *weights = ctx.saved_tensors
        shared, inverse, recompute = ctx.flags
        need_images = ctx.needs_input_grad[0]
        args = (grad_out.contiguous(), grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale)
        if torch.compiler.is_compiling():
            grad_images, grad_s_scale, grad_t_scale, *grad_weights = _run(
                "sublayer_couplings_backward", *args, *weights, shared, inverse, rows, streams, hidden, recompute,
                need_images,
            )
        else:
            grad_images, grad_s_scale, grad_t_scale, grad_weights = sublayer_couplings_backward(
                *args, HalfStepWeights(*weights), shared, inverse, rows, streams, hidden, recompute, need_images
            )
        grad_weights = [None if absent else g for absent, g in zip(ctx.absent, grad_weights)]
        return (grad_images if need_images else None, None, None, None, grad_s_scale, grad_t_scale, None, None, None,
                *grad_weights)


# --------------------------------------------------------------------------- input checks
def _check_tensor(name: str, value, dtypes, kind: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor ({kind}), got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise InputTypeError(f"{name} has dtype {value.dtype}; expected {kind}, one of {list(dtypes)}")
    return value


def _check_runnable(name: str, value: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter."""
    if value.is_cuda or (value.device.type == "cpu" and _INTERPRETED):
        return
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors, got {name} on {value.device}; move the data to a GPU, "
        "use the reference ops (backend='torch' or 'auto'), or set TRITON_INTERPRET=1 before importing "
        "triton to run the kernels in Triton's CPU interpreter"
    )


def _check_same(reference_name: str, reference: torch.Tensor, name: str, value: torch.Tensor, dtype: bool = True):
    if value.device != reference.device:
        raise InputError(
            f"{name} is on {value.device} but {reference_name} is on {reference.device}; put them on one device"
        )
    if dtype and value.dtype != reference.dtype:
        raise InputTypeError(
            f"{name} has dtype {value.dtype} but {reference_name} has dtype {reference.dtype}; convert one of them"
        )


def _check_image(name: str, x) -> torch.Tensor:
    _check_tensor(name, x, FLOAT_DTYPES, "a floating-point image")
    if x.dim() != 4:
        raise InputError(f"{name} must be 4-D (B, C, L, L), got shape {tuple(x.shape)}")
    _check_runnable(name, x)
    return x.contiguous()


def _check_row_index(row_index, x: torch.Tensor) -> torch.Tensor:
    _check_tensor("row_index", row_index, INDEX_DTYPES, "an integer index table")
    if row_index.dim() != 2:
        raise InputError(f"row_index must be 2-D (P, D), got shape {tuple(row_index.shape)}")
    _check_same("x", x, "row_index", row_index, dtype=False)
    return row_index.contiguous()


# --------------------------------------------------------------------------- public functions
def gather_patches(x: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`rgkern.core.reference.gather_patches`: ``(B, C, L, L) -> (B*P, D)``.

    ``row_index`` ``(P, D)`` (int64 or int32): flat indices into one ``(C, L, L)`` image,
    a whole sublayer table or any subset of its rows. Differentiable wrt ``x``.
    """
    x = _check_image("x", x)
    row_index = _check_row_index(row_index, x)
    return GatherPatchesFunction.apply(x, row_index)


def scatter_patches(x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`rgkern.core.reference.scatter_patches`: rows into a copy of ``x``.

    ``rows`` ``(B*P, D)`` of ``x``'s dtype; the patches of ``row_index`` must not overlap
    (true of every sublayer table and its subsets). Differentiable wrt ``x`` and ``rows``.
    """
    x = _check_image("x", x)
    _check_tensor("rows", rows, FLOAT_DTYPES, "floating-point patch rows")
    _check_same("x", x, "rows", rows)
    row_index = _check_row_index(row_index, x)
    expected = (x.shape[0] * row_index.shape[0], row_index.shape[1])
    if tuple(rows.shape) != expected:
        raise InputError(
            f"rows has shape {tuple(rows.shape)}, expected (B*P, D) = {expected} for x of shape "
            f"{tuple(x.shape)} and row_index of shape {tuple(row_index.shape)}"
        )
    return ScatterPatchesFunction.apply(x, rows.contiguous(), row_index)


def _promote_to(x: torch.Tensor, value):
    if (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and x.is_floating_point()
        and value.dtype.itemsize < x.dtype.itemsize
    ):
        return value.to(x.dtype)
    return value


def affine_coupling(
    x: torch.Tensor,
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    mask: torch.Tensor,
    inverse: bool = False,
):
    """Kernel version of :func:`rgkern.core.reference.affine_coupling` (one fused kernel each way).

    Args:
        x, s_raw, t_raw: ``(N, D)``; s_scale, t_scale, mask: ``(D,)``; one dtype and device.
        inverse: apply the inverse half-step.
    Returns:
        ``y`` ``(N, D)`` and the per-row log-det ``(N,)``, float64 for float64 ``x``, else
        float32. Differentiable wrt x, s_raw, t_raw, s_scale and t_scale (not the mask).
    """
    _check_tensor("x", x, FLOAT_DTYPES, "floating-point patch rows")
    if x.dim() != 2:
        raise InputError(f"x must be 2-D patch rows (N, D), got shape {tuple(x.shape)}")
    _check_runnable("x", x)
    # s/t network outputs in a narrower float than the rows (as autocast can give) are
    # promoted, as the reference's type promotion does: coupling arithmetic runs in x's dtype.
    s_raw, t_raw = (_promote_to(x, value) for value in (s_raw, t_raw))
    rows_like = {"s_raw": s_raw, "t_raw": t_raw}
    per_dim = {"s_scale": s_scale, "t_scale": t_scale, "mask": mask}
    for name, value in {**rows_like, **per_dim}.items():
        _check_tensor(name, value, FLOAT_DTYPES, "floating point")
        _check_same("x", x, name, value)
    for name, value in rows_like.items():
        if value.shape != x.shape:
            raise InputError(f"{name} has shape {tuple(value.shape)}, expected the shape of x {tuple(x.shape)}")
    for name, value in per_dim.items():
        if tuple(value.shape) != (x.shape[1],):
            raise InputError(f"{name} has shape {tuple(value.shape)}, expected (D,) = ({x.shape[1]},)")
    if mask.requires_grad:
        raise InputError("mask requires grad, but the coupling mask is a constant; pass mask.detach()")
    return AffineCouplingFunction.apply(
        x.contiguous(),
        s_raw.contiguous(),
        t_raw.contiguous(),
        s_scale.contiguous(),
        t_scale.contiguous(),
        mask.contiguous(),
        bool(inverse),
    )


def coupling_half_step(
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    inverse: bool = False,
):
    """Kernel version of :func:`rgkern.core.reference.coupling_half_step`: one fused launch forward.

    Args:
        x: rows ``(N, D)``; mask, s_scale, t_scale: ``(D,)``, one device; weights: a
            :class:`HalfStepWeights` of one float dtype (x's, or a narrower autocast dtype).
        inverse: apply the inverse half-step.
    Returns:
        ``y`` ``(N, D)`` and the per-row log-det ``(N,)``, float64 for float64 ``x``, else
        float32. Differentiable wrt x, the scales and the weights (not the mask).
    """
    _check_tensor("x", x, FLOAT_DTYPES, "floating-point patch rows")
    if x.dim() != 2:
        raise InputError(f"x must be 2-D patch rows (N, D), got shape {tuple(x.shape)}")
    _check_runnable("x", x)
    dim = x.shape[1]
    for name, value in {"mask": mask, "s_scale": s_scale, "t_scale": t_scale}.items():
        _check_tensor(name, value, FLOAT_DTYPES, "floating point")
        _check_same("x", x, name, value, dtype=False)
        if tuple(value.shape) != (dim,):
            raise InputError(f"{name} has shape {tuple(value.shape)}, expected (D,) = ({dim},)")
    if mask.requires_grad:
        raise InputError("mask requires grad, but the coupling mask is a constant; pass mask.detach()")
    _check_half_step_weights(x, dim, weights)
    return CouplingHalfStepFunction.apply(
        x.contiguous(), mask.contiguous(), s_scale.contiguous(), t_scale.contiguous(), bool(inverse),
        *(None if t is None else t.contiguous() for t in weights),
    )


def _check_half_step_weights(x: torch.Tensor, dim: int, weights: HalfStepWeights, what: str = "weights") -> None:
    """One half-step's weights for rows of width ``dim`` like ``x`` (dtypes, devices, shapes)."""
    if not isinstance(weights, HalfStepWeights):
        raise InputTypeError(f"{what} must be a HalfStepWeights, got {type(weights).__name__}")
    compute = weights.w_last.dtype
    if compute not in FLOAT_DTYPES or compute.itemsize > x.dtype.itemsize:
        raise InputTypeError(f"the weights have dtype {compute}; expected x's dtype {x.dtype} or a narrower float")
    vector_dtype = weights.b_last.dtype
    if vector_dtype not in (compute, x.dtype):
        raise InputTypeError(f"{what}.b_last has dtype {vector_dtype}; expected the weights' {compute} or x's {x.dtype}")
    n_res, hidden, n_mid = weights.n_res, weights.hidden, weights.n_mid
    last_in = hidden if weights.w_first is not None else dim
    expected = {
        "w_last": (n_res, 2, dim, last_in), "b_last": (n_res, 2, dim), "slope_last": (n_res, 2, last_in),
    }
    if weights.w_first is not None:
        expected.update(w_first=(n_res, 2, hidden, dim), b_first=(n_res, 2, hidden), slope_first=(n_res, 2, dim))
        if weights.w_mid is not None:
            expected.update(w_mid=(n_mid, n_res, 2, hidden, hidden), b_mid=(n_mid, n_res, 2, hidden),
                            slope_mid=(n_mid, n_res, 2, hidden))
    for name in HalfStepWeights._fields:
        value = getattr(weights, name)
        if name not in expected:
            if value is not None:
                raise InputError(f"{what}.{name} must be None for this layout (w_first and w_mid present or absent with it)")
            continue
        wanted = compute if name.startswith("w_") else vector_dtype
        _check_tensor(f"{what}.{name}", value, (wanted,), f"dtype {wanted}, as the other {'weights' if name.startswith('w_') else 'biases and slopes'}")
        _check_same("x", x, f"{what}.{name}", value, dtype=False)
        if tuple(value.shape) != expected[name]:
            raise InputError(f"{what}.{name} has shape {tuple(value.shape)}, expected {expected[name]}")


def sublayer_couplings(
    images: torch.Tensor,
    row_index: torch.Tensor,
    mask: torch.Tensor,
    flipped_mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    shared: bool = False,
    inverse: bool = False,
    recompute: bool = False,
):
    """Kernel version of :func:`rgkern.core.reference.sublayer_couplings`: a sublayer's coupling
    half-steps on whole images, one fused launch each forward (the first gathers the patches,
    the last scatters them back).

    Args:
        images: ``(B, C, L, L)``; row_index: ``(P, D)`` patches that do not overlap (a
            sublayer's table, :meth:`rgkern.Geometry.row_index`); mask, flipped_mask: ``(D,)``;
            s_scale, t_scale: ``(pairs, D)``; weights: a :class:`HalfStepWeights` whose tensors
            carry a leading pair dimension; one device.
        shared: both half-steps of a block use one pair of networks (variant "authors");
            else half-step ``j`` uses pair ``j`` (``pairs`` even).
        inverse: run the half-steps in reverse, each inverted.
        recompute: keep no activations for the backward; recompute them there (activation
            checkpointing, half-step by half-step).
    Returns:
        the new images and the per-image log-det ``(B,)``, float64 for float64 images, else
        float32. Differentiable wrt the images, the scales and the weights (not the masks).
    """
    images = _check_image("images", images)
    row_index = _check_row_index(row_index, images)
    dim = row_index.shape[1]
    for name, value in {"mask": mask, "flipped_mask": flipped_mask}.items():
        _check_tensor(name, value, FLOAT_DTYPES, "floating point")
        _check_same("images", images, name, value, dtype=False)
        if tuple(value.shape) != (dim,):
            raise InputError(f"{name} has shape {tuple(value.shape)}, expected (D,) = ({dim},)")
        if value.requires_grad:
            raise InputError(f"{name} requires grad, but the coupling mask is a constant; pass {name}.detach()")
    _check_tensor("s_scale", s_scale, FLOAT_DTYPES, "floating point")
    pairs = s_scale.shape[0] if s_scale.dim() == 2 else 0
    if pairs < 1 or (not shared and pairs % 2):
        raise InputError(f"s_scale has shape {tuple(s_scale.shape)}; expected (pairs, D) with pairs >= 1"
                         + ("" if shared else ", even (two half-steps per block, a pair each)"))
    for name, value in {"s_scale": s_scale, "t_scale": t_scale}.items():
        _check_tensor(name, value, FLOAT_DTYPES, "floating point")
        _check_same("images", images, name, value, dtype=False)
        if tuple(value.shape) != (pairs, dim):
            raise InputError(f"{name} has shape {tuple(value.shape)}, expected (pairs, D) = ({pairs}, {dim})")
    if not isinstance(weights, HalfStepWeights):
        raise InputTypeError(f"weights must be a HalfStepWeights, got {type(weights).__name__}")
    for name, value in zip(HalfStepWeights._fields, weights):
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != pairs):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"weights.{name} is {got}; expected a tensor with a leading pair dimension of {pairs}")
    _check_half_step_weights(images, dim, pair_weights(weights, 0), "weights[pair]")
    return SublayerCouplingsFunction.apply(
        images, row_index, mask.contiguous(), flipped_mask.contiguous(), s_scale.contiguous(), t_scale.contiguous(),
        bool(shared), bool(inverse), bool(recompute), *(None if t is None else t.contiguous() for t in weights),
    )

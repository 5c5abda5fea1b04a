"""The fused coupling ops: autograd Functions, operators and the public functions.

``coupling_half_step(x, mask, s_scale, t_scale, weights, inverse) -> (y (N, D), logdet (N,))``
on patch rows, and ``sublayer_couplings(images, row_index, mask, flipped_mask, s_scale,
t_scale, weights, shared, inverse, recompute) -> (images, logdet (B,))`` for a whole
sublayer, with the signatures and conventions of :mod:`rgkern.core.reference`. The public
functions check their inputs (:mod:`rgkern.kernels.checks`); the Functions call the host
functions of :mod:`.half_step` and :mod:`.sublayer` through their
:class:`~rgkern.kernels.operator.Operator`\\ s, whose signatures take the nine stacked weights
from :meth:`HalfStepWeights.parameters`.
"""
import torch
from torch.autograd.function import once_differentiable

from rgkern.core.errors import InputError
from rgkern.core.precision import accumulator_dtype

from ..checks import (
    FLOAT_DTYPES,
    check_half_step_weights,
    check_image,
    check_row_index,
    check_rows,
    check_stacked_weights,
    check_tensor,
    check_vectors,
)
from ..operator import Operator
from .half_step import activation_shapes, coupling_half_step_backward, coupling_half_step_forward
from .sublayer import sublayer_buffer_shapes, sublayer_couplings_backward, sublayer_couplings_forward
from .weights import HalfStepWeights, pair_weights

__all__ = ["coupling_half_step", "sublayer_couplings", "CouplingHalfStepFunction", "SublayerCouplingsFunction"]

_TENSOR = torch.Tensor
_WEIGHTS = HalfStepWeights.parameters()
# x or the images, the scales and the nine weights (an absent weight's gradient is empty).
_GRADIENTS = tuple[(_TENSOR,) * (3 + len(_WEIGHTS))]


def _gradients_like(first: torch.Tensor, s_scale: torch.Tensor, t_scale: torch.Tensor, weights) -> tuple:
    """Shapes of a backward operator's outputs (its fake)."""
    return (torch.empty_like(first), torch.empty_like(s_scale), torch.empty_like(t_scale),
            *(first.new_empty(0) if w is None else torch.empty_like(w) for w in weights))


# --------------------------------------------------------------------------- one half-step on rows
def _half_step(x, mask, s_scale, t_scale, *rest):
    weights, (inverse, save, compute_dtype) = HalfStepWeights.split_arguments(rest)
    return coupling_half_step_forward(x, mask, s_scale, t_scale, weights, inverse, save, compute_dtype=compute_dtype)


def _half_step_fake(x, mask, s_scale, t_scale, *rest):
    weights, (inverse, save, compute) = HalfStepWeights.split_arguments(rest)
    stream_shape, hidden_shape = activation_shapes(x.shape[0], x.shape[1], weights, save)
    return (torch.empty_like(x), x.new_empty((x.shape[0],), dtype=accumulator_dtype(x.dtype)),
            x.new_empty(stream_shape, dtype=compute), x.new_empty(hidden_shape, dtype=compute))


def _half_step_backward(grad_y, grad_logdet, x, mask, s_scale, t_scale, *rest):
    weights, (inverse, streams, hidden_acts) = HalfStepWeights.split_arguments(rest)
    grad_x, grad_s, grad_t, grads = coupling_half_step_backward(
        grad_y, grad_logdet, x, mask, s_scale, t_scale, weights, inverse, streams, hidden_acts
    )
    return (grad_x, grad_s.clone(), grad_t.clone(), *grads.as_operator_grads(x))


half_step_op = Operator(
    "coupling_half_step", _half_step,
    [("x", _TENSOR), ("mask", _TENSOR), ("s_scale", _TENSOR), ("t_scale", _TENSOR), *_WEIGHTS,
     ("inverse", bool), ("save", bool), ("compute_dtype", torch.dtype)],
    tuple[_TENSOR, _TENSOR, _TENSOR, _TENSOR], fake=_half_step_fake,
)
half_step_backward_op = Operator(
    "coupling_half_step_backward", _half_step_backward,
    [("grad_y", _TENSOR), ("grad_logdet", _TENSOR), ("x", _TENSOR), ("mask", _TENSOR), ("s_scale", _TENSOR),
     ("t_scale", _TENSOR), *_WEIGHTS, ("inverse", bool), ("streams", _TENSOR), ("hidden_acts", _TENSOR)],
    _GRADIENTS,
    fake=lambda grad_y, grad_logdet, x, mask, s_scale, t_scale, *rest: _gradients_like(x, s_scale, t_scale, HalfStepWeights.split_arguments(rest)[0]),
)


class CouplingHalfStepFunction(torch.autograd.Function):
    """(y, logdet) = the fused half-step (:mod:`rgkern.kernels.coupling`).

    ``apply(x, mask, s_scale, t_scale, inverse, compute_dtype, *weights)`` with the nine
    entries of a :class:`HalfStepWeights` (None where absent; compute_dtype None: the
    weights'); inputs contiguous and validated by the caller. The forward keeps the activations only when some input needs a gradient.
    Gradients flow to x, the scales and every weight; the mask is a constant. Operators
    ``rgkern::coupling_half_step`` and ``rgkern::coupling_half_step_backward``.
    """

    @staticmethod
    def forward(ctx, x, mask, s_scale, t_scale, inverse, compute_dtype, *weights):
        save = any(ctx.needs_input_grad)
        compute_dtype = HalfStepWeights(*weights).w_last.dtype if compute_dtype is None else compute_dtype
        y, logdet, streams, hidden_acts = half_step_op(x, mask, s_scale, t_scale, *weights, bool(inverse), save, compute_dtype)
        ctx.inverse = bool(inverse)
        ctx.absent = [w is None for w in weights]
        if save:
            ctx.save_for_backward(x, mask, s_scale, t_scale, streams, hidden_acts, *weights)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        x, mask, s_scale, t_scale, streams, hidden_acts, *weights = ctx.saved_tensors
        # grad_logdet is read as it is: a sum's gradient arrives expanded (stride 0).
        args = (grad_y.contiguous(), grad_logdet, x, mask, s_scale, t_scale)
        if torch.compiler.is_compiling():
            grad_x, grad_s_scale, grad_t_scale, *grad_weights = half_step_backward_op(
                *args, *weights, ctx.inverse, streams, hidden_acts
            )
        else:  # the host function itself: its slope gradients need no copies
            grad_x, grad_s_scale, grad_t_scale, grad_weights = coupling_half_step_backward(
                *args, HalfStepWeights(*weights), ctx.inverse, streams, hidden_acts
            )
        grad_weights = [None if absent else g for absent, g in zip(ctx.absent, grad_weights)]
        return (grad_x, None, grad_s_scale, grad_t_scale, None, None, *grad_weights)


def coupling_half_step(
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    inverse: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of :func:`rgkern.core.reference.coupling_half_step`: one fused launch forward.

    Args:
        x: rows ``(N, D)``; mask, s_scale, t_scale: ``(D,)``, one device; weights: a
            :class:`HalfStepWeights` of one float dtype (x's, or a narrower autocast dtype).
        inverse: apply the inverse half-step.
        compute_dtype: the matmuls' operand dtype (a narrower autocast dtype than the weights',
            which the kernels cast as they load them); the weights' by default.
    Returns:
        ``y`` ``(N, D)`` and the per-row log-det ``(N,)``, float64 for float64 ``x``, else
        float32. Differentiable wrt x, the scales and the weights (not the mask).
    """
    check_rows("x", x)
    dim = x.shape[1]
    check_vectors("x", x, {"mask": mask}, (dim,), constant=True)
    check_vectors("x", x, {"s_scale": s_scale, "t_scale": t_scale}, (dim,))
    compute_dtype = check_half_step_weights(x, dim, weights, compute_dtype=compute_dtype)
    return CouplingHalfStepFunction.apply(
        x.contiguous(), mask.contiguous(), s_scale.contiguous(), t_scale.contiguous(), bool(inverse), compute_dtype,
        *weights.contiguous(),
    )


# --------------------------------------------------------------------------- a whole sublayer on images
def _sublayer(images, row_index, mask, flipped_mask, s_scale, t_scale, *rest):
    weights, (shared, inverse, compute_dtype, keep_rows, keep_activations) = HalfStepWeights.split_arguments(rest)
    return sublayer_couplings_forward(images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared, inverse,
                                      keep_rows, keep_activations, compute_dtype=compute_dtype)


def _sublayer_fake(images, row_index, mask, flipped_mask, s_scale, t_scale, *rest):
    weights, (shared, inverse, compute, keep_rows, keep_activations) = HalfStepWeights.split_arguments(rest)
    rows_shape, stream_shape, hidden_shape = sublayer_buffer_shapes(
        images.shape[0], row_index.shape, s_scale.shape[0], weights, shared, keep_rows, keep_activations)
    return (torch.empty_like(images), images.new_empty((images.shape[0],), dtype=accumulator_dtype(images.dtype)),
            images.new_empty(rows_shape), images.new_empty(stream_shape, dtype=compute),
            images.new_empty(hidden_shape, dtype=compute))


def _sublayer_backward(grad_out, grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale, *rest):
    weights, (shared, inverse, compute_dtype, rows, streams, hidden_acts, recompute, grad_images_needed) = (
        HalfStepWeights.split_arguments(rest))
    grad_images, grad_s, grad_t, grads = sublayer_couplings_backward(
        grad_out, grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale, weights, shared, inverse,
        rows, streams, hidden_acts, recompute, grad_images_needed, compute_dtype=compute_dtype,
    )
    return (grad_images, grad_s.clone(), grad_t.clone(), *grads.as_operator_grads(images))


_SUBLAYER_INPUTS = [("images", _TENSOR), ("row_index", _TENSOR), ("mask", _TENSOR), ("flipped_mask", _TENSOR),
                    ("s_scale", _TENSOR), ("t_scale", _TENSOR), *_WEIGHTS, ("shared", bool), ("inverse", bool),
                    ("compute_dtype", torch.dtype)]
sublayer_op = Operator(
    "sublayer_couplings", _sublayer, _SUBLAYER_INPUTS + [("keep_rows", bool), ("keep_activations", bool)],
    tuple[_TENSOR, _TENSOR, _TENSOR, _TENSOR, _TENSOR], fake=_sublayer_fake,
)
sublayer_backward_op = Operator(
    "sublayer_couplings_backward", _sublayer_backward,
    [("grad_out", _TENSOR), ("grad_logdet", _TENSOR), *_SUBLAYER_INPUTS, ("rows", _TENSOR), ("streams", _TENSOR),
     ("hidden_acts", _TENSOR), ("recompute", bool), ("grad_images_needed", bool)],
    _GRADIENTS,
    fake=lambda grad_out, grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale, *rest:
        _gradients_like(images, s_scale, t_scale, HalfStepWeights.split_arguments(rest)[0]),
)


class SublayerCouplingsFunction(torch.autograd.Function):
    """(images, logdet) = every coupling half-step of a sublayer on whole images
    (:func:`rgkern.kernels.coupling.sublayer.sublayer_couplings_forward`: the patch gather and
    scatter fused into the first and last half-steps).

    ``apply(images, row_index, mask, flipped_mask, s_scale, t_scale, shared, inverse,
    recompute, compute_dtype, *weights)`` with the nine entries of a :class:`HalfStepWeights` of stacked
    tensors (None where absent); inputs contiguous and validated by the caller. The forward
    keeps every half-step's input rows when some input needs a gradient, and their activations
    unless ``recompute`` (then the backward recomputes them, half-step by half-step).
    Gradients flow to the images, the scales and every weight. Operators
    ``rgkern::sublayer_couplings`` and ``rgkern::sublayer_couplings_backward``.
    """

    @staticmethod
    def forward(ctx, images, row_index, mask, flipped_mask, s_scale, t_scale, shared, inverse, recompute, compute_dtype,
                *weights):
        needs = any(ctx.needs_input_grad)
        compute_dtype = HalfStepWeights(*weights).w_last.dtype if compute_dtype is None else compute_dtype
        ctx.flags = (bool(shared), bool(inverse), bool(recompute), compute_dtype)
        out, logdet, rows, streams, hidden_acts = sublayer_op(
            images, row_index, mask, flipped_mask, s_scale, t_scale, *weights, bool(shared), bool(inverse), compute_dtype,
            needs, needs and not recompute,
        )
        ctx.absent = [w is None for w in weights]
        if needs:
            if recompute:  # the forward's reused slots: the backward recomputes every half-step's
                streams = hidden_acts = rows.new_empty((0,))
            ctx.save_for_backward(images, row_index, mask, flipped_mask, s_scale, t_scale, rows, streams, hidden_acts, *weights)
        return out, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_logdet):
        images, row_index, mask, flipped_mask, s_scale, t_scale, rows, streams, hidden_acts, *weights = ctx.saved_tensors
        shared, inverse, recompute, compute_dtype = ctx.flags
        need_images = ctx.needs_input_grad[0]
        args = (grad_out.contiguous(), grad_logdet, images, row_index, mask, flipped_mask, s_scale, t_scale)
        if torch.compiler.is_compiling():
            grad_images, grad_s_scale, grad_t_scale, *grad_weights = sublayer_backward_op(
                *args, *weights, shared, inverse, compute_dtype, rows, streams, hidden_acts, recompute, need_images,
            )
        else:  # the host function itself: its slope gradients need no copies
            grad_images, grad_s_scale, grad_t_scale, grad_weights = sublayer_couplings_backward(
                *args, HalfStepWeights(*weights), shared, inverse, rows, streams, hidden_acts, recompute, need_images,
                compute_dtype=compute_dtype,
            )
        grad_weights = [None if absent else g for absent, g in zip(ctx.absent, grad_weights)]
        return (grad_images if need_images else None, None, None, None, grad_s_scale, grad_t_scale, None, None, None,
                None, *grad_weights)


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
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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
        compute_dtype: the matmuls' operand dtype (a narrower autocast dtype than the weights',
            which the kernels cast as they load them); the weights' by default.
    Returns:
        the new images and the per-image log-det ``(B,)``, float64 for float64 images, else
        float32. Differentiable wrt the images, the scales and the weights (not the masks).
    """
    images = check_image("images", images).contiguous()
    row_index = check_row_index(row_index, images).contiguous()
    dim = row_index.shape[1]
    check_vectors("images", images, {"mask": mask, "flipped_mask": flipped_mask}, (dim,), constant=True)
    check_tensor("s_scale", s_scale, FLOAT_DTYPES, "floating point")
    pairs = s_scale.shape[0] if s_scale.dim() == 2 else 0
    if pairs < 1 or (not shared and pairs % 2):
        raise InputError(f"s_scale has shape {tuple(s_scale.shape)}; expected (pairs, D) with pairs >= 1"
                         + ("" if shared else ", even (two half-steps per block, a pair each)"))
    check_vectors("images", images, {"s_scale": s_scale, "t_scale": t_scale}, (pairs, dim))
    check_stacked_weights(weights, pairs)
    compute_dtype = check_half_step_weights(images, dim, pair_weights(weights, 0), "weights[pair]", compute_dtype)
    return SublayerCouplingsFunction.apply(
        images, row_index, mask.contiguous(), flipped_mask.contiguous(), s_scale.contiguous(), t_scale.contiguous(),
        bool(shared), bool(inverse), bool(recompute), compute_dtype, *weights.contiguous(),
    )

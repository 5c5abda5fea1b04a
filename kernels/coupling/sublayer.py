"""Host side of a whole sublayer's fused couplings on whole images: ``2 * blocks`` half-step launches."""
from typing import Callable, Optional, Sequence

import torch
import triton

from rgkern.core.precision import accumulator_dtype

from .half_step import (
    PatchTable,
    activation_shapes,
    backward_tiles,
    launch_backward,
    launch_forward,
    launch_weight_grads,
    partial_layout,
)
from .weights import HalfStepWeights, pair_weights


def half_step_order(pairs: int, shared: bool, inverse: bool) -> list:
    """``(pair, flipped, use)`` of each half-step of a sublayer, in the order they run.

    Half-step ``2 * block + flipped`` of a sublayer of ``pairs`` networks pairs: pair
    ``2 * block + flipped`` of its own, or ``block`` when ``shared`` (both half-steps of a
    block use one pair; ``use`` = flipped tells them apart, else 0). Reversed when ``inverse``.
    """
    blocks = pairs if shared else pairs // 2
    steps = range(2 * blocks - 1, -1, -1) if inverse else range(2 * blocks)
    return [(step // 2, step % 2, step % 2) if shared else (step, step % 2, 0) for step in steps]


def sublayer_buffer_shapes(batch: int, row_index_shape: Sequence[int], pairs: int, weights: HalfStepWeights, shared: bool,
                           keep_rows: bool, keep_activations: bool) -> tuple[tuple, tuple, tuple]:
    """Shapes of the ``rows``, ``streams`` and ``hidden_acts`` buffers :func:`sublayer_couplings_forward` returns."""
    num_patches, dim = row_index_shape
    n_rows = batch * num_patches
    steps = 2 * (pairs if shared else pairs // 2)
    stream_shape, hidden_shape = activation_shapes(n_rows, dim, pair_weights(weights, 0), keep_activations)
    lead = (steps,) if keep_activations else (1,)
    return (steps - 1 if keep_rows else min(2, steps - 1), n_rows, dim), lead + stream_shape, lead + hidden_shape


def sublayer_couplings_forward(
    images: torch.Tensor,
    row_index: torch.Tensor,
    mask: torch.Tensor,
    flipped_mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    shared: bool,
    inverse: bool,
    keep_rows: bool,
    keep_activations: bool,
    empty: Callable[..., torch.Tensor] = torch.empty,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every coupling half-step of a sublayer on whole images: ``2 * blocks`` launches.

    The first half-step gathers its rows from ``images`` through ``row_index`` and copies the
    images to the output (where some pixels are in no patch); the last writes its rows into the
    output; the log-det accumulates per row in the kernels.

    Args:
        images: ``(B, C, L, L)`` contiguous; row_index: ``(P, D)`` int64/int32, patches that do
            not overlap (a sublayer's); mask, flipped_mask: ``(D,)`` (half-steps ``2 * block``
            and ``2 * block + 1``); s_scale, t_scale: ``(pairs, D)``; weights: a
            :class:`HalfStepWeights` of tensors with a leading pair dimension (:func:`pair_weights`);
            shared: both half-steps of a block use one pair (:func:`half_step_order`).
        keep_rows: keep every half-step's input rows (for the backward); else two are reused.
        keep_activations: keep every half-step's activations (else the backward recomputes them).
        compute_dtype: the dtype of the ``tl.dot`` operands and the activations (the autocast
            dtype); the weights' by default (which may be wider: the kernels cast them as they load).
    Returns:
        ``out`` (images), ``logdet (B,)`` (float64 for float64 images, else float32), ``rows``
        ``(half-steps - 1, B*P, D)`` (input of half-step ``j + 1`` in run order at ``j``),
        ``streams`` and ``hidden_acts``: :func:`activation_shapes` with a leading half-step dimension.
    """
    batch = images.shape[0]
    num_patches, dim = row_index.shape
    n_rows = batch * num_patches
    pairs = s_scale.shape[0]
    order = half_step_order(pairs, shared, inverse)
    acc = accumulator_dtype(images.dtype)
    compute = weights.w_last.dtype if compute_dtype is None else compute_dtype
    rows_shape, stream_shape, hidden_shape = sublayer_buffer_shapes(batch, row_index.shape, pairs, weights, shared,
                                                                    keep_rows, keep_activations)
    streams = empty(stream_shape, dtype=compute, device=images.device)
    hidden_acts = empty(hidden_shape, dtype=compute, device=images.device)
    rows = empty(rows_shape, dtype=images.dtype, device=images.device)
    out = empty(images.shape, dtype=images.dtype, device=images.device)
    logdet = empty((n_rows,), dtype=acc, device=images.device)
    if n_rows == 0:
        return out.copy_(images), logdet.new_zeros((batch,)), rows, streams, hidden_acts
    patches = PatchTable(row_index, num_patches, images[0].numel())
    covers_all = num_patches * dim == patches.image_numel  # the patches of a sublayer never overlap
    masks = (mask, flipped_mask)
    last = len(order) - 1
    for j, (pair, flipped, _) in enumerate(order):
        x = images if j == 0 else rows[(j - 1) % rows.shape[0]]
        y = out if j == last else rows[j % rows.shape[0]]
        slot = j if keep_activations else 0
        launch_forward(x, masks[flipped], s_scale[pair], t_scale[pair], pair_weights(weights, pair), inverse,
                        streams[slot], hidden_acts[slot], y, logdet, patches, gather=j == 0, scatter=j == last,
                        accumulate=j > 0, copy_to=out if j == 0 and not covers_all else None)
    return out, logdet.view(batch, num_patches).sum(dim=1), rows, streams, hidden_acts


def sublayer_couplings_backward(
    grad_out: torch.Tensor,
    grad_logdet: torch.Tensor,
    images: torch.Tensor,
    row_index: torch.Tensor,
    mask: torch.Tensor,
    flipped_mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    shared: bool,
    inverse: bool,
    rows: torch.Tensor,
    streams: torch.Tensor,
    hidden_acts: torch.Tensor,
    recompute: bool,
    grad_images_needed: bool = True,
    empty: Callable[..., torch.Tensor] = torch.empty,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, HalfStepWeights]:
    """Gradients of :func:`sublayer_couplings_forward` (run with ``keep_rows``).

    Args:
        grad_out: images' gradient ``(B, C, L, L)`` contiguous; grad_logdet ``(B,)`` in the
            accumulator dtype, any stride (an expanded one is read as it is);
        recompute: the forward kept no activations (``keep_activations=False``): each
            half-step's are recomputed from its input rows before its backward;
        grad_images_needed: else the pixels no patch covers get no gradient (not copied);
        compute_dtype: as passed to the forward;
        the rest as passed to and returned by the forward.
    Returns:
        ``grad_images`` ``(B, C, L, L)``, ``grad_s_scale``, ``grad_t_scale`` ``(pairs, D)`` and a
        :class:`HalfStepWeights` of stacked gradients (None where the weight is absent). A
        pair used by two half-steps gets their sum; every reduction is deterministic.
    """
    batch = images.shape[0]
    num_patches, dim = row_index.shape
    n_rows = batch * num_patches
    pairs = s_scale.shape[0]
    order = half_step_order(pairs, shared, inverse)
    acc = accumulator_dtype(images.dtype)
    compute = weights.w_last.dtype if compute_dtype is None else compute_dtype
    first = pair_weights(weights, 0)
    uses = 2 if shared else 1
    layout = partial_layout(dim, first, pairs)
    grad_images = empty(images.shape, dtype=images.dtype, device=images.device)
    grad_rows = empty((min(2, len(order) - 1), n_rows, dim), dtype=images.dtype, device=images.device)
    stream_shape, hidden_shape = activation_shapes(n_rows, dim, first, True)
    grad_streams = empty(stream_shape, dtype=compute, device=images.device)
    grad_hidden = empty(hidden_shape, dtype=compute, device=images.device)
    grads = weights.grad_buffers(empty, images.device)
    if recompute:
        streams, hidden_acts = empty((1,) + stream_shape, dtype=compute, device=images.device), empty(
            (1,) + hidden_shape, dtype=compute, device=images.device)
        scratch_rows = empty((n_rows, dim), dtype=images.dtype, device=images.device)
        scratch_logdet = empty((n_rows,), dtype=acc, device=images.device)
    patches = PatchTable(row_index, num_patches, images[0].numel())
    covers_all = num_patches * dim == patches.image_numel
    masks = (mask, flipped_mask)
    last = len(order) - 1
    copy_through = grad_images_needed and not covers_all
    tiles, candidates, programs = None, (), 1
    if n_rows > 0:
        # Timed (where tuning applies) on the first backward launch: the last half-step's.
        pair, flipped, _ = order[last]
        tiles, candidates = backward_tiles(
            grad_out, grad_logdet, rows[last - 1], masks[flipped], s_scale[pair], t_scale[pair], pair_weights(weights, pair),
            inverse, streams[0 if recompute else last], hidden_acts[0 if recompute else last], grad_rows[0], layout, n_rows,
            patches, scatter=True, copy_to=grad_images if copy_through else None)
        programs = triton.cdiv(n_rows, tiles.block_rows)
    partial = (torch.zeros if n_rows == 0 else empty)((uses * programs, layout.width), dtype=acc, device=images.device)
    used = set()
    for j in (range(last, -1, -1) if n_rows > 0 else ()):
        pair, flipped, use = order[j]
        step_weights = pair_weights(weights, pair)
        x = images if j == 0 else rows[j - 1]
        slot = 0 if recompute else j
        if recompute:
            launch_forward(x, masks[flipped], s_scale[pair], t_scale[pair], step_weights, inverse, streams[0], hidden_acts[0],
                            scratch_rows, scratch_logdet, patches, gather=j == 0)
        grad_y = grad_out if j == last else grad_rows[j % grad_rows.shape[0]]
        grad_x = grad_images if j == 0 else grad_rows[(j - 1) % grad_rows.shape[0]]
        launch_backward(grad_y, grad_logdet, x, masks[flipped], s_scale[pair], t_scale[pair], step_weights, inverse,
                         streams[slot], hidden_acts[slot], grad_streams, grad_hidden, grad_x,
                         partial[use * programs:(use + 1) * programs], layout.offsets(pair), n_rows, tiles, candidates,
                         patches, gather=j == 0, scatter=j == last,
                         copy_to=grad_images if j == last and copy_through else None)
        launch_weight_grads(step_weights, pair_weights(grads, pair), streams[slot], hidden_acts[slot], grad_streams,
                             grad_hidden, n_rows, acc, accumulate=pair in used)
        used.add(pair)
    if n_rows == 0:
        grad_images.copy_(grad_out)
        grads = HalfStepWeights(*(None if g is None else g.zero_() for g in grads))
    grad_s, grad_t, first_slopes, mid_slopes, last_slopes = layout.split(partial.sum(dim=0), pairs)
    return (grad_images, grad_s.to(s_scale.dtype), grad_t.to(t_scale.dtype),
            grads.with_slope_grads(weights, first_slopes, mid_slopes, last_slopes))

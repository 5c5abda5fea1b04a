"""Host side of one fused coupling half-step on rows: buffers, launches, and the two entry points."""
from typing import Callable, NamedTuple, Optional

import torch
import triton

from rgkern.core.precision import accumulator_dtype

from ..launch import launch_kernel
from .backward import coupling_half_step_bwd_kernel, coupling_weight_grad_kernel
from .device import TANH_SERIES_LIMIT
from .forward import coupling_half_step_fwd_kernel
from .tiles import (
    MAX_REGISTERS,
    WEIGHT_GRAD_MAX_ROWS,
    TileConfig,
    choose_tiles,
    dot_tf32,
    dot_upcast,
    launch_with_candidates,
    tile_candidates,
)
from .weights import HalfStepWeights


def activation_shapes(n_rows: int, dim: int, weights: HalfStepWeights, save: bool) -> tuple[tuple, tuple]:
    """Shapes of the ``streams`` and ``hidden_acts`` buffers :func:`coupling_half_step_forward` returns."""
    n_res, n_mlp = weights.n_res, weights.n_mlp
    stream_slots = n_res + 1 if save else 2
    hidden_slots = max(1, n_res * n_mlp if save else min(2, n_res * n_mlp))
    hidden_acts = (hidden_slots, 2, n_rows, weights.hidden_width) if n_mlp else (1,)
    return (stream_slots, 2, n_rows, dim), hidden_acts


class PatchTable(NamedTuple):
    """How a launch addresses images: the patch table ``(P, D)``, P, and the values per image."""

    row_index: torch.Tensor
    num_patches: int
    image_numel: int


def _half_step_constants(dim: int, weights: HalfStepWeights, inverse: bool, gather: bool, scatter: bool, copy: bool,
                         acc: torch.dtype, compute: torch.dtype, tiles: "TileConfig") -> dict:
    """The compile-time arguments the forward and backward half-step kernels share, and the launch options."""
    return dict(
        DIM=dim,
        HIDDEN=weights.hidden_width,
        HAS_HIDDEN=weights.n_mlp > 0,
        INVERSE=bool(inverse),
        GATHER=gather,
        SCATTER=scatter,
        COPY=copy,
        ACC_FP64=acc == torch.float64,
        DOT_TF32=dot_tf32(compute),
        DOT_UPCAST=dot_upcast(compute),
        SERIES_LIMIT=TANH_SERIES_LIMIT[acc],
        BLOCK_ROWS=tiles.block_rows,
        BLOCK_D=tiles.block_d,
        BLOCK_H=tiles.block_h,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        maxnreg=MAX_REGISTERS,
    )


def launch_forward(x: torch.Tensor, mask: torch.Tensor, s_scale: torch.Tensor, t_scale: torch.Tensor,
                   weights: HalfStepWeights, inverse: bool, streams: torch.Tensor, hidden_acts: torch.Tensor, y: torch.Tensor,
                   logdet: torch.Tensor, patches: Optional[PatchTable] = None, gather: bool = False, scatter: bool = False,
                   accumulate: bool = False, copy_to: Optional[torch.Tensor] = None) -> None:
    """:func:`coupling_half_step_fwd_kernel` on ``n_rows = logdet.numel()`` > 0 rows, tiles by :func:`choose_tiles`.

    ``patches`` describes the images that ``x`` (``gather``) and ``y`` (``scatter``) are;
    ``copy_to``: images that the x images are first copied to (needs ``gather``).
    """
    n_rows, dim = logdet.shape[0], mask.shape[0]
    acc = accumulator_dtype(x.dtype)
    compute = streams.dtype  # the activations' dtype is the tl.dot operands'
    w = weights.present()
    row_index, num_patches, image_numel = patches if patches is not None else (x, 1, dim)

    def launch(tiles, streams=streams, hidden_acts=hidden_acts, y=y, logdet=logdet, copy_to=copy_to):
        launch_kernel(
            coupling_half_step_fwd_kernel,
            (triton.cdiv(n_rows, tiles.block_rows),),
            x, mask, s_scale, t_scale,
            w.w_first, w.b_first, w.slope_first,
            w.w_mid, w.b_mid, w.slope_mid,
            w.w_last, w.b_last, w.slope_last,
            streams, hidden_acts, y, logdet, row_index, x if copy_to is None else copy_to,
            n_rows, weights.n_res, weights.n_mid, streams.shape[0], hidden_acts.shape[0], num_patches, image_numel,
            ACCUMULATE=accumulate,
            **_half_step_constants(dim, weights, inverse, gather, scatter, copy_to is not None, acc, compute, tiles),
        )

    def trial(tiles):
        scratch = [torch.empty_like(t) for t in (streams, hidden_acts, y, logdet)]
        launch(tiles, *scratch, copy_to=None if copy_to is None else torch.empty_like(copy_to))

    candidates = tile_candidates(n_rows, dim, weights.hidden_width, compute, weights.w_last.dtype)
    tiles = choose_tiles(("forward", compute, weights.w_last.dtype, dim, weights.hidden_width, weights.n_mlp), candidates, trial, x)
    launch_with_candidates(launch, tiles, candidates)


def coupling_half_step_forward(
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    inverse: bool = False,
    save: bool = True,
    empty: Callable[..., torch.Tensor] = torch.empty,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused half-step.

    Args:
        x: rows ``(N, D)`` contiguous; mask, s_scale, t_scale: ``(D,)`` contiguous, x's dtype
            (the scales may be wider); weights: :class:`HalfStepWeights`, contiguous, the
            weights in the compute dtype or x's (the kernels cast them as they load them).
        inverse: the inverse half-step.
        save: keep every activation for :func:`coupling_half_step_backward`.
        empty: allocator with ``torch.empty``'s signature (tests pass a NaN-filling one).
        compute_dtype: the dtype of the ``tl.dot`` operands and the activations (the autocast
            dtype); the weights' by default.
    Returns:
        ``y (N, D)``, ``logdet (N,)`` (float64 for float64 x, else float32), and the
        activations ``streams (n_res + 1, 2, N, D)``, ``hidden_acts (n_res * n_mlp, 2, N, H)`` in the
        compute dtype (fewer slots, reused, without ``save``).
    """
    n_rows, dim = x.shape
    compute = weights.w_last.dtype if compute_dtype is None else compute_dtype
    stream_shape, hidden_shape = activation_shapes(n_rows, dim, weights, save)
    y = empty((n_rows, dim), dtype=x.dtype, device=x.device)
    logdet = empty((n_rows,), dtype=accumulator_dtype(x.dtype), device=x.device)
    streams = empty(stream_shape, dtype=compute, device=x.device)
    hidden_acts = empty(hidden_shape, dtype=compute, device=x.device)
    if n_rows > 0:
        launch_forward(x, mask, s_scale, t_scale, weights, inverse, streams, hidden_acts, y, logdet)
    return y, logdet, streams, hidden_acts




class PartialLayout(NamedTuple):
    """Where the backward kernel's per-program partial sums go: a row of ``width`` values per
    program, holding ``pairs`` half-steps' worth of each kind (s_scale, t_scale, first, mid
    and last slopes) kind by kind, so that one sum over the rows gives every kind contiguous
    and stacked over pairs. ``starts`` and ``sizes`` per kind (one pair's size)."""

    width: int
    starts: tuple
    sizes: tuple

    def offsets(self, pair: int) -> tuple:
        """The kernel's ``s_offset .. last_offset`` for pair ``pair``."""
        return tuple(start + pair * size for start, size in zip(self.starts, self.sizes))

    def split(self, sums: torch.Tensor, pairs: int) -> list:
        """The summed row cut into the kinds, each ``(pairs, size)``."""
        return [sums[start:start + pairs * size].view(pairs, size) for start, size in zip(self.starts, self.sizes)]


def partial_layout(dim: int, weights: HalfStepWeights, pairs: int = 1) -> PartialLayout:
    n_res, n_mid, n_mlp, hidden_acts = weights.n_res, weights.n_mid, weights.n_mlp, weights.hidden_width
    sizes = (dim, dim, n_res * 2 * dim if n_mlp else 0, n_mid * n_res * 2 * hidden_acts, n_res * 2 * (hidden_acts if n_mlp else dim))
    starts, start = [], 0
    for size in sizes:
        starts.append(start)
        start += pairs * size
    return PartialLayout(start, tuple(starts), sizes)


def backward_tiles(grad_y: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                   s_scale: torch.Tensor, t_scale: torch.Tensor, weights: HalfStepWeights, inverse: bool,
                   streams: torch.Tensor, hidden_acts: torch.Tensor, grad_x: torch.Tensor, layout: PartialLayout, n_rows: int,
                   patches: Optional[PatchTable] = None, gather: bool = False, scatter: bool = False,
                   copy_to: Optional[torch.Tensor] = None) -> tuple:
    """``(tiles, candidates)`` of :func:`coupling_half_step_bwd_kernel` (:func:`choose_tiles`,
    timed on this launch with scratch outputs); the partial sums' rows depend on the choice."""
    dim, compute, acc = mask.shape[0], streams.dtype, accumulator_dtype(x.dtype)
    candidates = tile_candidates(n_rows, dim, weights.hidden_width, compute, weights.w_last.dtype)

    def trial(tiles):
        partial = torch.empty((triton.cdiv(n_rows, tiles.block_rows), layout.width), dtype=acc, device=x.device)
        scratch = [torch.empty_like(t) for t in (streams, hidden_acts, grad_x)]
        launch_backward(grad_y, grad_logdet, x, mask, s_scale, t_scale, weights, inverse, streams, hidden_acts, *scratch,
                         partial, layout.offsets(0), n_rows, tiles, (tiles,), patches, gather, scatter,
                         None if copy_to is None else torch.empty_like(copy_to))

    tiles = choose_tiles(("backward", compute, weights.w_last.dtype, dim, weights.hidden_width, weights.n_mlp), candidates, trial, x)
    return tiles, candidates


def launch_backward(grad_y: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                    s_scale: torch.Tensor, t_scale: torch.Tensor, weights: HalfStepWeights, inverse: bool,
                    streams: torch.Tensor, hidden_acts: torch.Tensor, grad_streams: torch.Tensor, grad_hidden: torch.Tensor,
                    grad_x: torch.Tensor, partial: torch.Tensor, partial_offsets: tuple[int, ...], n_rows: int,
                    tiles: TileConfig, candidates: tuple, patches: Optional[PatchTable] = None, gather: bool = False,
                    scatter: bool = False, copy_to: Optional[torch.Tensor] = None) -> None:
    """:func:`coupling_half_step_bwd_kernel` on ``n_rows`` > 0 rows, one program per row of ``partial``
    (``tiles`` from :func:`backward_tiles`).

    ``patches``: the images that ``grad_y`` (``scatter``) and ``x``, ``grad_x`` (``gather``)
    are; ``copy_to``: images that the grad_y images are first copied to (needs ``scatter``).
    """
    dim = mask.shape[0]
    acc = partial.dtype
    compute = streams.dtype
    w = weights.present()
    row_index, num_patches, image_numel = patches if patches is not None else (x, 1, dim)

    def launch(tiles):
        launch_kernel(
            coupling_half_step_bwd_kernel,
            (partial.shape[0],),
            grad_y, grad_logdet, x, mask, s_scale, t_scale,
            w.w_first, w.slope_first, w.w_mid, w.slope_mid, w.w_last, w.slope_last,
            streams, hidden_acts, grad_streams, grad_hidden, grad_x, partial, row_index, grad_y if copy_to is None else copy_to,
            n_rows, weights.n_res, weights.n_mid, partial.stride(0), *partial_offsets,
            num_patches, image_numel, grad_logdet.stride(0),
            **_half_step_constants(dim, weights, inverse, gather, scatter, copy_to is not None, acc, compute, tiles),
        )

    launch_with_candidates(launch, tiles, candidates)


def launch_weight_grads(weights: HalfStepWeights, grads: HalfStepWeights, streams: torch.Tensor, hidden_acts: torch.Tensor,
                        grad_streams: torch.Tensor, grad_hidden: torch.Tensor, n_rows: int, acc: torch.dtype,
                        accumulate: bool = False) -> None:
    """The weight and bias gradients of every kind of linear into ``grads`` (one launch per kind,
    tiles by :func:`choose_tiles`).

    ``grads``: buffers shaped as the weights (their w and b entries; None where absent);
    ``accumulate``: add to what they hold.
    """
    dim = weights.w_last.shape[-2]
    hidden_width, n_res, n_mlp = weights.hidden_width, weights.n_res, weights.n_mlp
    compute = streams.dtype
    flags = dict(ACC_FP64=acc == torch.float64, DOT_TF32=dot_tf32(compute), DOT_UPCAST=dot_upcast(compute))

    def kind(src, grad, weight, slopes, grad_w, grad_b, src_slots, src_shift, grad_slots, grad_shift, in_w, out_w):
        def launch(tiles, grad_w=grad_w, grad_b=grad_b):
            block_out = tiles.block_d if out_w == dim else tiles.block_h
            block_in = tiles.block_d if in_w == dim else tiles.block_h
            launch_kernel(
                coupling_weight_grad_kernel,
                (weight.numel() // (in_w * out_w), triton.cdiv(out_w, block_out), triton.cdiv(in_w, block_in)),
                src, grad, slopes, grad_w, grad_b,
                n_rows, n_res, src_slots, src_shift, grad_slots, grad_shift,
                IN_W=in_w,
                OUT_W=out_w,
                ACCUMULATE=accumulate,
                BLOCK_ROWS=min(tiles.block_rows, WEIGHT_GRAD_MAX_ROWS),
                BLOCK_OUT=block_out,
                BLOCK_IN=block_in,
                num_warps=tiles.num_warps,
                num_stages=tiles.num_stages,
                maxnreg=MAX_REGISTERS,
                **flags,
            )

        candidates = tile_candidates(n_rows, dim, hidden_width, compute, weights.w_last.dtype)
        tiles = choose_tiles(("weight_grad", compute, weights.w_last.dtype, in_w, out_w), candidates,
                             lambda tiles: launch(tiles, torch.empty_like(grad_w), torch.empty_like(grad_b)), grad)
        launch_with_candidates(launch, tiles, candidates)

    if n_mlp:
        kind(streams, grad_hidden, weights.w_first, weights.slope_first, grads.w_first, grads.b_first,
             1, 0, n_mlp, 0, dim, hidden_width)
        kind(hidden_acts, grad_streams, weights.w_last, weights.slope_last, grads.w_last, grads.b_last,
             n_mlp, n_mlp - 1, 1, 1, hidden_width, dim)
    else:
        kind(streams, grad_streams, weights.w_last, weights.slope_last, grads.w_last, grads.b_last, 1, 0, 1, 1, dim, dim)
    if weights.n_mid:
        kind(hidden_acts, grad_hidden, weights.w_mid, weights.slope_mid, grads.w_mid, grads.b_mid,
             n_mlp, 0, n_mlp, 1, hidden_width, hidden_width)




def coupling_half_step_backward(
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    inverse: bool,
    streams: torch.Tensor,
    hidden_acts: torch.Tensor,
    empty: Callable[..., torch.Tensor] = torch.empty,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, HalfStepWeights]:
    """Gradients of :func:`coupling_half_step_forward` (run with ``save=True``); the compute
    dtype is the activations'.

    Args:
        grad_y ``(N, D)`` of x's dtype, contiguous, and grad_logdet ``(N,)`` (accumulator
        dtype, any stride); the rest as passed to and returned by the forward.
    Returns:
        ``grad_x (N, D)``, ``grad_s_scale``, ``grad_t_scale`` ``(D,)`` (the scales' dtype) and a
        :class:`HalfStepWeights` of the weight gradients (None where the weight is absent),
        every reduction over rows deterministic.
    """
    n_rows, dim = x.shape
    acc = accumulator_dtype(x.dtype)
    compute = streams.dtype
    layout = partial_layout(dim, weights)
    grad_x = empty((n_rows, dim), dtype=x.dtype, device=x.device)
    args = (grad_y, grad_logdet, x, mask, s_scale, t_scale, weights, inverse, streams, hidden_acts)
    tiles, candidates = backward_tiles(*args, grad_x, layout, n_rows) if n_rows > 0 else (None, ())
    programs = max(1, triton.cdiv(n_rows, tiles.block_rows)) if n_rows > 0 else 1
    partial = (torch.zeros if n_rows == 0 else empty)((programs, layout.width), dtype=acc, device=x.device)
    grad_streams = empty(streams.shape, dtype=compute, device=x.device)
    grad_hidden = empty(hidden_acts.shape, dtype=compute, device=x.device)
    grads = weights.grad_buffers(empty, x.device)
    if n_rows > 0:
        launch_backward(*args, grad_streams, grad_hidden, grad_x, partial, layout.offsets(0), n_rows, tiles, candidates)
        launch_weight_grads(weights, grads, streams, hidden_acts, grad_streams, grad_hidden, n_rows, acc)
    else:
        grads = HalfStepWeights(*(None if g is None else g.zero_() for g in grads))
    grad_s, grad_t, first, mid, last = (part[0] for part in layout.split(partial.sum(dim=0), 1))
    return grad_x, grad_s.to(s_scale.dtype), grad_t.to(t_scale.dtype), grads.with_slope_grads(weights, first, mid, last)


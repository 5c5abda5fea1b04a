"""One coupling half-step fused: the s and t residual MLPs, the affine coupling and its log-det.

A half-step on patch rows ``x`` ``(N, D)`` with the checkerboard ``mask`` ``m`` (1 on the
conditioning half)::

    r_0 = x * m                                     (the same for both networks)
    r_{i+1} = r_i / sqrt(2) + f_i(r_i)              for the n_res residual blocks i
    f_i = linear_last . swish . ... . linear_first . swish      (n_mlp + 1 linears)
    s_raw, t_raw = r_{n_res} of network 0 (s) and network 1 (t)
    y, logdet = affine_coupling(x, s_raw, t_raw, ...)           (rgkern.kernels.affine_coupling)

``swish(u) = u * sigmoid(slope * u)`` with a learned per-feature slope before every linear;
the linears are weight-normalised by the caller, and the last one of each block carries the
residual's 1/sqrt(2) in its weight and bias (``rgkern.core.model.CouplingNetworks.prepared``).
Weights are in ``nn.Linear`` layout ``(w_out, w_in)`` and stacked per half-step as
``[residual block, network]``:

* ``w_first (R, 2, H, D)``, ``b_first (R, 2, H)``, ``slope_first (R, 2, D)``;
* ``w_mid (M, R, 2, H, H)``, ``b_mid (M, R, 2, H)``, ``slope_mid (M, R, 2, H)``: the
  ``M = n_mlp - 1`` hidden-to-hidden linears (absent for n_mlp < 2);
* ``w_last (R, 2, D, W)``, ``b_last (R, 2, D)``, ``slope_last (R, 2, W)`` with ``W = H``,
  or ``W = D`` when n_mlp = 0 (then the block is this one linear and "first"/"mid" are absent).

Kernels (one program = a block of ``BLOCK_ROWS`` rows, or a weight tile for the weight
gradients):

* :func:`coupling_half_step_fwd_kernel`: every linear of both networks and the coupling, for
  its rows, in one launch. Each linear is a ``tl.dot`` loop with the Swish in the prologue and
  bias (and residual) in the epilogue; its output goes to a row-block of a global activation
  buffer, re-read in tiles by the next linear after a CTA barrier (a row-block's activations
  are only ever touched by its own program). With ``save`` the buffers keep every block's
  activations for the backward pass; without, two slots are reused in turn.
* :func:`coupling_half_step_bwd_kernel`: the coupling's backward, then the input gradients of
  every linear in reverse (Swish derivative and residual fused), for its rows; writes the
  gradient of every linear's output (for the weight gradients), the row gradient, and per
  program partial sums of the slope and scale gradients.
* :func:`coupling_weight_grad_kernel`: ``dW = g^T @ swish(u)`` and ``db = sum g`` of one kind
  of linear for all its matrices; each program owns a weight tile and loops over all rows,
  so the reduction is deterministic (no atomics). ``ACCUMULATE`` adds to the buffers.

Host functions: :func:`coupling_half_step_forward` / ``_backward`` run one half-step on rows
(``transform_rows``: the incremental encoder and decoder, inpainting). A whole sublayer on
whole images is :func:`sublayer_couplings_forward` / ``_backward``: its ``2 * blocks``
half-steps, the weights of all its pairs of networks stacked on a leading dimension. There the
first launch reads its rows straight from the images through the sublayer's patch table
(``GATHER``) and copies the images to the output (``COPY``, where some pixels are in no patch:
they come through unchanged), the last writes its rows into the output (``SCATTER``), the
log-det accumulates per row in the kernels (``ACCUMULATE``), the backward mirrors it (the
gradient of the uncovered pixels passes through; the per-image log-det gradient is read
where it lies, an expanded one too), and the weight gradients go straight into stacked
buffers, a pair shared by two half-steps ("authors") accumulating. No gather, scatter, copy
or log-det add outside the kernels.

Tiles: :data:`TUNING_CONFIGS` per compute dtype; on a CUDA device :func:`choose_tiles` times
them once per kernel and shape on scratch outputs and keeps the fastest (see there for when
it does not); the launch recording records them all for the ahead-of-time compile.

Matmuls: ``tl.dot`` on the weights' dtype with float32 accumulation (bfloat16 / float16
under autocast; float32 as TF32 unless ``torch.get_float32_matmul_precision()`` is
"highest"); float64 data multiplies and accumulates in float64. Element-wise math in float32
(float64 for float64 data).
"""
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from rgkern.core.precision import accumulator_dtype

from .affine_coupling import TANH_SERIES_LIMIT, _load_tile, _tanh, _tanh_and_derivative
from .launch import interpreter_requested, launch_kernel
from . import launch as _launch

__all__ = [
    "coupling_half_step_fwd_kernel",
    "coupling_half_step_bwd_kernel",
    "coupling_weight_grad_kernel",
    "HalfStepWeights",
    "TileConfig",
    "TUNING_CONFIGS",
    "GPU_TILES",
    "AUTOTUNE_ENV",
    "tile_candidates",
    "tile_config",
    "tuning_enabled",
    "choose_tiles",
    "activation_shapes",
    "coupling_half_step_forward",
    "coupling_half_step_backward",
    "pair_weights",
    "half_step_order",
    "sublayer_buffer_shapes",
    "sublayer_couplings_forward",
    "sublayer_couplings_backward",
]

# The residual's 1/sqrt(2); a constexpr so that the kernels may read it.
SQRT_HALF = tl.constexpr(1 / math.sqrt(2))


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _dot(a, b, acc, ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc + a @ b``: float64 in float64, otherwise tl.dot with float32 accumulation.

    ``DOT_UPCAST`` (the interpreter only, whose bfloat16/float16 tl.dot returns garbage with
    Triton 3.9) multiplies the same values as float32, exactly as a tensor core would.
    """
    if DOT_UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif ACC_FP64:
        # Broadcast and sum: Triton 3.6 has no float64 tl.dot (3.9 has); float64 is for the
        # exactness tests, not for speed.
        acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif DOT_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _zeros(BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ACC_FP64: tl.constexpr):
    if ACC_FP64:
        z = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float64)
    else:
        z = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    return z


@triton.jit
def _load(ptr, mask, ACC_FP64: tl.constexpr, SCRATCH: tl.constexpr):
    """Load as the accumulator dtype; ``SCRATCH`` buffers are written by this launch, so they
    are read from L2 (``.cg``), past the SM's L1."""
    if SCRATCH:
        v = tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
        if ACC_FP64:
            v = v.to(tl.float64)
        else:
            v = v.to(tl.float32)
    else:
        v = _load_tile(ptr, 0, mask, ACC_FP64)
    return v


@triton.jit
def _sigmoid_and_derivative(z):
    """``sigmoid(z)`` and ``sigmoid(z) * (1 - sigmoid(z))`` from ``exp(-|z|)``: no overflow, and
    no cancellation in the derivative where sigmoid(z) is near 1."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1 / (1 + e), e / (1 + e)), e / ((1 + e) * (1 + e))


@triton.jit
def _sigmoid(z):
    sig, _ = _sigmoid_and_derivative(z)
    return sig


@triton.jit
def _linear_forward(
    src, w, b, slope, dst, residual, rows, row_live,
    IN_W: tl.constexpr, OUT_W: tl.constexpr, RESIDUAL: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """``dst = swish(src) @ w^T + b`` (``+ residual / sqrt(2)``) on this program's rows.

    src ``(N, IN_W)``, dst and residual ``(N, OUT_W)`` row-major; w ``(OUT_W, IN_W)``.
    """
    for o0 in range(0, OUT_W, BLOCK_OUT):
        cols = o0 + tl.arange(0, BLOCK_OUT)
        col_live = cols < OUT_W
        acc = _zeros(BLOCK_ROWS, BLOCK_OUT, ACC_FP64)
        for k0 in range(0, IN_W, BLOCK_IN):
            ks = k0 + tl.arange(0, BLOCK_IN)
            k_live = ks < IN_W
            u = _load(src + rows[:, None] * IN_W + ks[None, :], row_live[:, None] & k_live[None, :], ACC_FP64, True)
            beta = _load(slope + ks, k_live, ACC_FP64, False)
            a = u * _sigmoid(beta[None, :] * u)
            wt = tl.load(w + cols[None, :] * IN_W + ks[:, None], mask=k_live[:, None] & col_live[None, :], other=0.0)
            acc = _dot(a.to(wt.dtype), wt, acc, ACC_FP64, DOT_TF32, DOT_UPCAST)
        out = acc + _load(b + cols, col_live, ACC_FP64, False)[None, :]
        offsets = rows[:, None] * OUT_W + cols[None, :]
        live = row_live[:, None] & col_live[None, :]
        if RESIDUAL:
            out += SQRT_HALF * _load(residual + offsets, live, ACC_FP64, True)
        tl.store(dst + offsets, out.to(dst.dtype.element_ty), mask=live)
    tl.debug_barrier()  # the next linear reads these rows in other threads' tiles


@triton.jit
def _linear_input_grad(
    grad_out, w, src, slope, grad_src, grad_residual, partial, rows, row_live,
    IN_W: tl.constexpr, OUT_W: tl.constexpr, RESIDUAL: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """Backward of :func:`_linear_forward` to its input, on this program's rows.

    ``g_a = grad_out @ w``; ``grad_src = g_a * swish'(src)`` (``+ grad_residual / sqrt(2)``);
    ``partial[k] = sum_rows g_a * d swish / d slope`` (this program's share of the slope
    gradient). grad_out ``(N, OUT_W)``, w ``(OUT_W, IN_W)``, src and grad_src ``(N, IN_W)``,
    partial ``(IN_W,)``.
    """
    for k0 in range(0, IN_W, BLOCK_IN):
        ks = k0 + tl.arange(0, BLOCK_IN)
        k_live = ks < IN_W
        acc = _zeros(BLOCK_ROWS, BLOCK_IN, ACC_FP64)
        for o0 in range(0, OUT_W, BLOCK_OUT):
            os = o0 + tl.arange(0, BLOCK_OUT)
            o_live = os < OUT_W
            g = tl.load(grad_out + rows[:, None] * OUT_W + os[None, :], mask=row_live[:, None] & o_live[None, :],
                        other=0.0, cache_modifier=".cg")
            wt = tl.load(w + os[:, None] * IN_W + ks[None, :], mask=o_live[:, None] & k_live[None, :], other=0.0)
            acc = _dot(g.to(wt.dtype), wt, acc, ACC_FP64, DOT_TF32, DOT_UPCAST)
        offsets = rows[:, None] * IN_W + ks[None, :]
        live = row_live[:, None] & k_live[None, :]
        u = _load(src + offsets, live, ACC_FP64, True)
        beta = _load(slope + ks, k_live, ACC_FP64, False)[None, :]
        sig, dsig = _sigmoid_and_derivative(beta * u)
        grad_u = acc * (sig + beta * u * dsig)
        # Dead rows loaded zeros (g = 0), so they add nothing to the sum.
        tl.store(partial + ks, tl.sum(acc * u * u * dsig, axis=0), mask=k_live)
        if RESIDUAL:
            grad_u += SQRT_HALF * _load(grad_residual + offsets, live, ACC_FP64, True)
        tl.store(grad_src + offsets, grad_u.to(grad_src.dtype.element_ty), mask=live)
    tl.debug_barrier()


@triton.jit
def _row_block(pid, n_rows, DIM: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Program ``pid``'s rows (int64), which are live, and the int64 strides of one network in
    the ``(slots, 2, n_rows, DIM)`` stream and ``(slots, 2, n_rows, HIDDEN)`` hidden buffers."""
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return rows, rows < n_rows, tl.full([], DIM, tl.int64) * n_rows, tl.full([], HIDDEN, tl.int64) * n_rows


@triton.jit
def _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM: tl.constexpr, IMAGES: tl.constexpr):
    """Offsets of the row entries ``(rows, cols)`` and which of them may be touched.

    Plain rows: row-major ``(n_rows, DIM)``. ``IMAGES``: elements of images ``(B, image_numel)``
    through the patch table ``row_index (num_patches, DIM)``, row ``b * num_patches + p`` being
    patch ``p`` of image ``b``; an index outside ``[0, image_numel)`` is never touched.
    """
    if IMAGES:
        sample = rows // num_patches
        patch = rows - sample * num_patches
        index = tl.load(row_index_ptr + patch[:, None] * DIM + cols[None, :], mask=live, other=0).to(tl.int64)
        offsets = sample[:, None] * image_numel + index
        inside = live & (index >= 0) & (index < image_numel)
    else:
        offsets = rows[:, None] * DIM + cols[None, :]
        inside = live
    return offsets, inside


@triton.jit
def _load_entries(ptr, offsets, inside, live, ACC_FP64: tl.constexpr):
    """Row entries as the accumulator dtype: 0 where not live, NaN where live but not inside."""
    values = _load(ptr + offsets, inside, ACC_FP64, False)
    return tl.where(inside | ~live, values, float("nan"))


@triton.jit
def _copy_share(src, dst, numel, BLOCK: tl.constexpr):
    """This program's share of ``dst[:numel] = src[:numel]``: the launch's programs split it evenly."""
    share = tl.cdiv(numel, tl.num_programs(0))
    start = tl.program_id(0).to(tl.int64) * share
    end = tl.minimum(start + share, numel)
    for c0 in range(0, share, BLOCK):
        offsets = start + c0 + tl.arange(0, BLOCK)
        live = offsets < end
        tl.store(dst + offsets, tl.load(src + offsets, mask=live), mask=live)


# --------------------------------------------------------------------------- kernels
@triton.jit
def coupling_half_step_fwd_kernel(
    x_ptr, mask_ptr, s_scale_ptr, t_scale_ptr,
    w_first_ptr, b_first_ptr, slope_first_ptr,
    w_mid_ptr, b_mid_ptr, slope_mid_ptr,
    w_last_ptr, b_last_ptr, slope_last_ptr,
    streams_ptr, hidden_ptr, y_ptr, logdet_ptr, row_index_ptr, copy_ptr,
    n_rows, n_res, n_mid, stream_slots, hidden_slots, num_patches, image_numel,
    DIM: tl.constexpr, HIDDEN: tl.constexpr, HAS_HIDDEN: tl.constexpr, INVERSE: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, ACCUMULATE: tl.constexpr, COPY: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr, SERIES_LIMIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward of one half-step for a block of rows (see the module docstring).

    x, y ``(n_rows, DIM)``, or with ``GATHER`` (x) / ``SCATTER`` (y) images ``(B,
    image_numel)`` addressed through ``row_index`` (``num_patches`` rows per image: the patch
    gather and scatter fused, see :func:`_entries`); logdet ``(n_rows,)`` float32 (float64
    with ACC_FP64), written, or with ``ACCUMULATE`` added to. ``COPY`` (with ``GATHER``): the
    programs first copy the x images to the images at ``copy_ptr``, for a later ``SCATTER``
    launch to overwrite the patches in (the pixels no patch covers come through).
    streams ``(stream_slots, 2, n_rows, DIM)``: residual stream ``i`` of network ``n`` in slot
    ``i % stream_slots`` (``n_res + 1`` slots to save them all, else 2); hidden
    ``(hidden_slots, 2, n_rows, HIDDEN)``: output of hidden linear ``j`` of block ``i`` in
    slot ``(i * n_mlp + j) % hidden_slots`` with ``n_mlp = n_mid + 1``.
    """
    pid = tl.program_id(0)
    rows, row_live, net_stream, net_hidden = _row_block(pid, n_rows, DIM, HIDDEN, BLOCK_ROWS)
    slot_stream = 2 * net_stream
    slot_hidden = 2 * net_hidden
    n_mlp = n_mid + 1
    if COPY:
        _copy_share(x_ptr, copy_ptr, tl.cast(n_rows // num_patches, tl.int64) * image_numel, BLOCK_ROWS * BLOCK_D)

    # r_0 = x * mask, for both networks.
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        x_offsets, x_inside = _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
        x = _load_entries(x_ptr, x_offsets, x_inside, live, ACC_FP64)
        cond = (x * _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]).to(streams_ptr.dtype.element_ty)
        offsets = rows[:, None] * DIM + cols[None, :]
        tl.store(streams_ptr + offsets, cond, mask=live)
        tl.store(streams_ptr + net_stream + offsets, cond, mask=live)
    tl.debug_barrier()

    for net in range(2):
        for i in range(n_res):
            stream_in = streams_ptr + (i % stream_slots).to(tl.int64) * slot_stream + net * net_stream
            stream_out = streams_ptr + ((i + 1) % stream_slots).to(tl.int64) * slot_stream + net * net_stream
            mat = i * 2 + net
            if HAS_HIDDEN:
                h_out = hidden_ptr + ((i * n_mlp) % hidden_slots).to(tl.int64) * slot_hidden + net * net_hidden
                _linear_forward(stream_in, w_first_ptr + mat * (HIDDEN * DIM), b_first_ptr + mat * HIDDEN,
                                slope_first_ptr + mat * DIM, h_out, h_out, rows, row_live,
                                DIM, HIDDEN, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_D)
                for m in range(n_mid):
                    h_in = h_out
                    h_out = hidden_ptr + ((i * n_mlp + m + 1) % hidden_slots).to(tl.int64) * slot_hidden + net * net_hidden
                    mid = (m * n_res * 2 + mat).to(tl.int64)
                    _linear_forward(h_in, w_mid_ptr + mid * (HIDDEN * HIDDEN), b_mid_ptr + mid * HIDDEN,
                                    slope_mid_ptr + mid * HIDDEN, h_out, h_out, rows, row_live,
                                    HIDDEN, HIDDEN, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_H)
                _linear_forward(h_out, w_last_ptr + mat * (DIM * HIDDEN), b_last_ptr + mat * DIM,
                                slope_last_ptr + mat * HIDDEN, stream_out, stream_in, rows, row_live,
                                HIDDEN, DIM, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_H)
            else:
                _linear_forward(stream_in, w_last_ptr + mat * (DIM * DIM), b_last_ptr + mat * DIM,
                                slope_last_ptr + mat * DIM, stream_out, stream_in, rows, row_live,
                                DIM, DIM, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_D)

    # The coupling on the final streams (s_raw: network 0, t_raw: network 1).
    raw = streams_ptr + slot_stream * (n_res % stream_slots)
    logdet = tl.sum(_zeros(BLOCK_ROWS, BLOCK_D, ACC_FP64), axis=1)
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = rows[:, None] * DIM + cols[None, :]
        x_offsets, x_inside = _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
        x = _load_entries(x_ptr, x_offsets, x_inside, live, ACC_FP64)
        s_raw = _load(raw + offsets, live, ACC_FP64, True)
        t_raw = _load(raw + net_stream + offsets, live, ACC_FP64, True)
        m = _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]
        keep = tl.where(col_live[None, :], 1 - m, 0)
        s = _tanh(_load(s_scale_ptr + cols, col_live, ACC_FP64, False)[None, :] * keep * s_raw, SERIES_LIMIT)
        t = _load(t_scale_ptr + cols, col_live, ACC_FP64, False)[None, :] * keep * t_raw
        if INVERSE:
            y = (x - t) * tl.exp(-s)
            logdet -= tl.sum(s, axis=1)
        else:
            y = x * tl.exp(s) + t
            logdet += tl.sum(s, axis=1)
        y_offsets, y_inside = _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM, SCATTER)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=y_inside)
    if ACCUMULATE:
        # Earlier half-steps' sum first, as ``logdet + ld`` on the host would add them.
        logdet = _load(logdet_ptr + rows, row_live, ACC_FP64, False) + logdet
    tl.store(logdet_ptr + rows, logdet.to(logdet_ptr.dtype.element_ty), mask=row_live)


@triton.jit(do_not_specialize=["s_offset", "t_offset", "first_offset", "mid_offset", "last_offset"])
def coupling_half_step_bwd_kernel(
    grad_y_ptr, grad_logdet_ptr, x_ptr, mask_ptr, s_scale_ptr, t_scale_ptr,
    w_first_ptr, slope_first_ptr, w_mid_ptr, slope_mid_ptr, w_last_ptr, slope_last_ptr,
    streams_ptr, hidden_ptr, grad_streams_ptr, grad_hidden_ptr, grad_x_ptr, partial_ptr, row_index_ptr, copy_ptr,
    n_rows, n_res, n_mid, partial_stride, s_offset, t_offset, first_offset, mid_offset, last_offset,
    num_patches, image_numel, grad_logdet_stride,
    DIM: tl.constexpr, HIDDEN: tl.constexpr, HAS_HIDDEN: tl.constexpr, INVERSE: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, COPY: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr, SERIES_LIMIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward of one half-step to its rows, for a block of rows.

    grad_y, x, grad_x ``(n_rows, DIM)``, or with ``SCATTER`` (grad_y) / ``GATHER`` (x and
    grad_x) images ``(B, image_numel)`` through ``row_index`` as in the forward; grad_logdet:
    one value per image (``num_patches`` rows), ``grad_logdet_stride`` apart. ``COPY`` (with
    ``SCATTER``): the programs first copy the grad_y images to the images at ``copy_ptr``, for
    a later ``GATHER`` launch to overwrite the patches in. streams / hidden: the forward's
    saved activations (``n_res + 1`` and ``n_res * n_mlp`` slots); grad_streams and
    grad_hidden: the same shapes, filled with the gradients of the streams and of every hidden
    linear's output. Partial sums over this program's rows, in the accumulator dtype, at
    ``partial_ptr + pid * partial_stride``: of the s_scale and t_scale gradients (``DIM``
    each) at ``s_offset`` and ``t_offset``, of the slope gradients of the first, mid and last
    linears (laid out as their slopes) at ``first_offset``, ``mid_offset``, ``last_offset``.
    """
    pid = tl.program_id(0)
    rows, row_live, net_stream, net_hidden = _row_block(pid, n_rows, DIM, HIDDEN, BLOCK_ROWS)
    slot_stream = 2 * net_stream
    slot_hidden = 2 * net_hidden
    n_mlp = n_mid + 1
    partial = partial_ptr + pid.to(tl.int64) * partial_stride
    if COPY:
        _copy_share(grad_y_ptr, copy_ptr, tl.cast(n_rows // num_patches, tl.int64) * image_numel, BLOCK_ROWS * BLOCK_D)

    # The coupling: gradients of s_raw and t_raw (into the last stream slot), the direct
    # part of grad_x, the scale-gradient partial sums.
    raw = streams_ptr + slot_stream * n_res
    grad_raw = grad_streams_ptr + slot_stream * n_res
    grad_logdet = _load(grad_logdet_ptr + (rows // num_patches) * grad_logdet_stride, row_live, ACC_FP64, False)[:, None]
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = rows[:, None] * DIM + cols[None, :]
        y_offsets, y_inside = _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM, SCATTER)
        x_offsets, x_inside = _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
        grad_y = _load_entries(grad_y_ptr, y_offsets, y_inside, live, ACC_FP64)
        x = _load_entries(x_ptr, x_offsets, x_inside, live, ACC_FP64)
        s_raw = _load(raw + offsets, live, ACC_FP64, True)
        t_raw = _load(raw + net_stream + offsets, live, ACC_FP64, True)
        s_scale = _load(s_scale_ptr + cols, col_live, ACC_FP64, False)[None, :]
        t_scale = _load(t_scale_ptr + cols, col_live, ACC_FP64, False)[None, :]
        m = _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]
        keep = tl.where(col_live[None, :], 1 - m, 0)
        s, tanh_slope = _tanh_and_derivative(s_scale * keep * s_raw, SERIES_LIMIT)
        if INVERSE:
            scale = tl.exp(-s)
            grad_s = -keep * (grad_y * (x - t_scale * keep * t_raw) * scale + grad_logdet)
            grad_t = -keep * grad_y * scale
        else:
            scale = tl.exp(s)
            grad_s = keep * (grad_y * x * scale + grad_logdet)
            grad_t = keep * grad_y
        grad_pre_tanh = grad_s * tanh_slope
        tl.store(grad_x_ptr + x_offsets, (grad_y * scale).to(grad_x_ptr.dtype.element_ty), mask=x_inside)
        tl.store(grad_raw + offsets, (grad_pre_tanh * s_scale).to(grad_streams_ptr.dtype.element_ty), mask=live)
        tl.store(grad_raw + net_stream + offsets, (grad_t * t_scale).to(grad_streams_ptr.dtype.element_ty), mask=live)
        tl.store(partial + s_offset + cols, tl.sum(grad_pre_tanh * s_raw, axis=0), mask=col_live)
        tl.store(partial + t_offset + cols, tl.sum(grad_t * t_raw, axis=0), mask=col_live)
    tl.debug_barrier()

    for net in range(2):
        for back in range(n_res):
            i = n_res - 1 - back
            mat = i * 2 + net
            stream_in = streams_ptr + i.to(tl.int64) * slot_stream + net * net_stream
            grad_in = grad_streams_ptr + i.to(tl.int64) * slot_stream + net * net_stream
            grad_out = grad_streams_ptr + (i + 1).to(tl.int64) * slot_stream + net * net_stream
            if HAS_HIDDEN:
                slot = (i * n_mlp + n_mid).to(tl.int64)
                _linear_input_grad(grad_out, w_last_ptr + mat * (DIM * HIDDEN), hidden_ptr + slot * slot_hidden + net * net_hidden,
                                   slope_last_ptr + mat * HIDDEN, grad_hidden_ptr + slot * slot_hidden + net * net_hidden,
                                   grad_out, partial + last_offset + mat * HIDDEN, rows, row_live,
                                   HIDDEN, DIM, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_H)
                for back_mid in range(n_mid):
                    m = n_mid - 1 - back_mid
                    slot = (i * n_mlp + m).to(tl.int64)
                    mid = (m * n_res * 2 + mat).to(tl.int64)
                    _linear_input_grad(grad_hidden_ptr + (slot + 1) * slot_hidden + net * net_hidden,
                                       w_mid_ptr + mid * (HIDDEN * HIDDEN), hidden_ptr + slot * slot_hidden + net * net_hidden,
                                       slope_mid_ptr + mid * HIDDEN, grad_hidden_ptr + slot * slot_hidden + net * net_hidden,
                                       grad_out, partial + mid_offset + mid * HIDDEN, rows, row_live,
                                       HIDDEN, HIDDEN, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_H)
                slot = (i * n_mlp).to(tl.int64)
                _linear_input_grad(grad_hidden_ptr + slot * slot_hidden + net * net_hidden, w_first_ptr + mat * (HIDDEN * DIM),
                                   stream_in, slope_first_ptr + mat * DIM, grad_in, grad_out,
                                   partial + first_offset + mat * DIM, rows, row_live,
                                   DIM, HIDDEN, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_D)
            else:
                _linear_input_grad(grad_out, w_last_ptr + mat * (DIM * DIM), stream_in, slope_last_ptr + mat * DIM,
                                   grad_in, grad_out, partial + last_offset + mat * DIM, rows, row_live,
                                   DIM, DIM, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_D)

    # The conditioner r_0 = x * mask feeds both networks.
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = rows[:, None] * DIM + cols[None, :]
        x_offsets, x_inside = _entries(rows, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
        m = _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]
        grad_cond = _load(grad_streams_ptr + offsets, live, ACC_FP64, True)
        grad_cond += _load(grad_streams_ptr + net_stream + offsets, live, ACC_FP64, True)
        grad_x = _load(grad_x_ptr + x_offsets, x_inside, ACC_FP64, True) + m * grad_cond
        tl.store(grad_x_ptr + x_offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=x_inside)


@triton.jit
def coupling_weight_grad_kernel(
    src_ptr, grad_ptr, slope_ptr, grad_w_ptr, grad_b_ptr,
    n_rows, n_res, src_block_slots, src_shift, grad_block_slots, grad_shift,
    IN_W: tl.constexpr, OUT_W: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """Weight and bias gradients of one kind of linear, for all its matrices.

    Grid ``(matrices, cdiv(OUT_W, BLOCK_OUT), cdiv(IN_W, BLOCK_IN))``. Matrix ``q = (m * n_res
    + i) * 2 + net`` (``m``: which mid linear, 0 for first and last) reads its input from slot
    ``i * src_block_slots + m + src_shift`` of src ``(slots, 2, n_rows, IN_W)`` and its output
    gradient from slot ``i * grad_block_slots + m + grad_shift`` of grad ``(slots, 2, n_rows,
    OUT_W)``; slope ``(matrices, IN_W)``. Writes ``grad_w[q] = grad^T @ swish(src)``
    ``(matrices, OUT_W, IN_W)`` and (programs with ``pid(2) == 0``) ``grad_b[q] = sum_rows
    grad`` ``(matrices, OUT_W)``, each tile summed over all rows by one program; with
    ``ACCUMULATE`` adds them to what the buffers hold (a pair of networks another half-step used).
    """
    q = tl.program_id(0)
    per_m = n_res * 2
    m = q // per_m
    i = (q % per_m) // 2
    net = q % 2
    src_net = tl.full([], IN_W, tl.int64) * n_rows
    grad_net = tl.full([], OUT_W, tl.int64) * n_rows
    src = src_ptr + (i * src_block_slots + m + src_shift).to(tl.int64) * (2 * src_net) + net * src_net
    grad = grad_ptr + (i * grad_block_slots + m + grad_shift).to(tl.int64) * (2 * grad_net) + net * grad_net
    outs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    ins = tl.program_id(2) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    out_live = outs < OUT_W
    in_live = ins < IN_W
    beta = _load(slope_ptr + q * IN_W + ins, in_live, ACC_FP64, False)[None, :]
    acc = _zeros(BLOCK_OUT, BLOCK_IN, ACC_FP64)
    bias = tl.sum(_zeros(BLOCK_OUT, BLOCK_ROWS, ACC_FP64), axis=1)
    for r0 in range(0, n_rows, BLOCK_ROWS):
        rs = r0 + tl.arange(0, BLOCK_ROWS)
        r_live = rs < n_rows
        g_t = tl.load(grad + rs[None, :].to(tl.int64) * OUT_W + outs[:, None], mask=out_live[:, None] & r_live[None, :], other=0.0)
        u = _load(src + rs[:, None].to(tl.int64) * IN_W + ins[None, :], r_live[:, None] & in_live[None, :], ACC_FP64, False)
        a = u * _sigmoid(beta * u)
        acc = _dot(g_t, a.to(g_t.dtype), acc, ACC_FP64, DOT_TF32, DOT_UPCAST)
        bias += tl.sum(g_t.to(acc.dtype), axis=1)
    q64 = q.to(tl.int64)
    w_offsets = q64 * (OUT_W * IN_W) + outs[:, None] * IN_W + ins[None, :]
    w_live = out_live[:, None] & in_live[None, :]
    if ACCUMULATE:
        acc = _load(grad_w_ptr + w_offsets, w_live, ACC_FP64, False) + acc
    tl.store(grad_w_ptr + w_offsets, acc.to(grad_w_ptr.dtype.element_ty), mask=w_live)
    if tl.program_id(2) == 0:
        if ACCUMULATE:
            bias = _load(grad_b_ptr + q64 * OUT_W + outs, out_live, ACC_FP64, False) + bias
        tl.store(grad_b_ptr + q64 * OUT_W + outs, bias.to(grad_b_ptr.dtype.element_ty), mask=out_live)


# --------------------------------------------------------------------------- host side
class HalfStepWeights(NamedTuple):
    """The stacked weights of one half-step (shapes in the module docstring).

    The weights ``w_*`` share one dtype, the compute dtype (the rows' dtype, or a narrower
    one under autocast); biases and slopes share one dtype, the weights' or the rows'.

    ``w_mid``/``b_mid``/``slope_mid`` are None when n_mlp < 2, ``w_first``/``b_first``/
    ``slope_first`` when n_mlp = 0.
    """

    w_first: Optional[torch.Tensor]
    b_first: Optional[torch.Tensor]
    slope_first: Optional[torch.Tensor]
    w_mid: Optional[torch.Tensor]
    b_mid: Optional[torch.Tensor]
    slope_mid: Optional[torch.Tensor]
    w_last: torch.Tensor
    b_last: torch.Tensor
    slope_last: torch.Tensor

    @property
    def n_res(self) -> int:
        return self.w_last.shape[0]

    @property
    def n_mid(self) -> int:
        return 0 if self.w_mid is None else self.w_mid.shape[0]

    @property
    def n_mlp(self) -> int:
        return 0 if self.w_first is None else self.n_mid + 1

    @property
    def hidden(self) -> int:
        """Width of the hidden linears (the patch width D when there are none)."""
        return self.w_last.shape[-1]


# The narrowest tile over any width (``tl.dot`` needs every tile dimension >= 16).
MIN_TILE = 16


class TileConfig(NamedTuple):
    """Block sizes and launch options of the half-step kernels: rows per program, tile widths
    over D and H, warps, software-pipeline stages."""

    block_rows: int
    block_d: int
    block_h: int
    num_warps: int
    num_stages: int = 3
    #: The narrowest hidden tile this configuration may be narrowed to (:func:`tile_candidates`):
    #: a launch whose hidden width would need a narrower one does not use it.
    min_block_h: int = MIN_TILE


#: The configurations each fused kernel is tuned over on a CUDA device (:func:`choose_tiles`),
#: by compute dtype; the first is the default, used wherever nothing is timed. Rows per program
#: 32 or 16 (more programs for the few rows of the top levels and small batches); tiles 64 wide
#: over D and H (32 over H in bfloat16 and float16), narrowed to the widths (``tl.dot`` needs
#: every tile dimension >= 16). The defaults came from a sweep of register use on one half-step
#: (D = 48, H = 70) and from the compiles; none of these is timed (no GPU was available).
TUNING_CONFIGS = {
    # Rows per program, tiles over D and H, warps, stages. Compiled for sm_80 and sm_90 under
    # Triton 3.6 and 3.9 (bench/RESULTS.md): 32 rows on 4 warps spilled in bfloat16 under 3.6
    # once the first half-step gathered from the image, so bfloat16 takes 8 warps as float32
    # does; bfloat16 with 64-wide hidden tiles spilled up to 24 B under 3.6, 32-wide ones none;
    # 64 rows on 8 warps spilled 40-880 B on sm_80 under both, so the set has no 64-row one.
    # float32 on 16 rows spilled 8-16 B on sm_80 under 3.9 on 4 warps (14 of 96 with 32-wide
    # hidden tiles), none on 8 warps (at most 200 registers under either Triton).
    torch.float32: (TileConfig(32, 64, 64, 8, 3), TileConfig(16, 64, 64, 8, 3)),
    # bfloat16 on 32 rows with 16-wide hidden tiles (hidden widths up to 16) spilled 24-32 B in
    # the forward kernels that gather from the image under 3.6 (255 registers; 4 or 16 warps,
    # 1 or 2 stages, or a 32-wide tile over 8 hidden columns spilled too), so such launches
    # take the 16-row configuration (164-220 registers, no spills under either Triton).
    torch.bfloat16: (TileConfig(32, 64, 32, 8, 3, min_block_h=32), TileConfig(16, 64, 32, 4, 3)),
    torch.float16: (TileConfig(32, 64, 32, 8, 3, min_block_h=32), TileConfig(16, 64, 32, 4, 3)),
    # float64 multiplies by broadcast-and-sum (for the exactness tests, not for speed): one config.
    torch.float64: (TileConfig(16, 16, 16, 4, 3),),
}
#: The default GPU configuration per compute dtype (the first of :data:`TUNING_CONFIGS`).
GPU_TILES = {dtype: configs[0] for dtype, configs in TUNING_CONFIGS.items()}
# Registers a thread may use (PTX .maxnreg). Without it ptxas picked 64 to 128 for some fused
# specialisations and spilled 4 to 36 B (scripts/compile_kernels.py, 22 of 360 in float32 and
# bfloat16); with it they use what they need (e.g. 92) and none spills. Not timed on a GPU:
# fewer resident programs per SM is the price where a kernel needs many registers.
MAX_REGISTERS = 255
# Under the interpreter each program and loop iteration costs Python time: one tile per width.
INTERPRETER_MAX_TILE = 128
#: Environment variable: "0" turns the timing off, so that every process uses the defaults
#: (and so the same floating-point summation order: bit-identical runs on one GPU model).
AUTOTUNE_ENV = "RGKERN_AUTOTUNE"
# Rows per step of the weight-gradient kernel's loop (the K of its ``g^T @ a`` products) at
# most: at 64 its float32 IEEE specialisations spilled 284-304 B on sm_80 and sm_90 (the FMA
# path of tl.dot holds both operand tiles in registers).
WEIGHT_GRAD_MAX_ROWS = 32


def tile_candidates(n_rows: int, dim: int, hidden: int, dtype: torch.dtype) -> tuple:
    """The :class:`TileConfig`\\ s a launch may use, the default first.

    On a GPU :data:`TUNING_CONFIGS` of the compute ``dtype``, narrowed to the widths ``dim`` and
    ``hidden`` (equal ones once; those whose hidden tile would fall below their
    ``min_block_h`` left out); never dependent on ``n_rows`` (``torch.compile`` with dynamic
    batch sizes must not specialise on it). Under the interpreter (outside
    :func:`~rgkern.kernels.launch.gpu_block_sizes`) one configuration, as wide as the data
    allows up to :data:`INTERPRETER_MAX_TILE`.
    """
    def width(w, cap):
        return max(MIN_TILE, min(cap, triton.next_power_of_2(int(w))))

    if interpreter_requested() and _launch._gpu_block_requests == 0:
        cap = INTERPRETER_MAX_TILE
        return (TileConfig(width(n_rows, cap), width(dim, cap), width(hidden, cap), 4),)
    narrowed = (t._replace(block_d=width(dim, t.block_d), block_h=width(hidden, t.block_h)) for t in TUNING_CONFIGS[dtype])
    return tuple(dict.fromkeys(t for t in narrowed if t.block_h >= t.min_block_h))


def tile_config(n_rows: int, dim: int, hidden: int, dtype: torch.dtype) -> TileConfig:
    """The default block sizes for ``n_rows`` rows of width ``dim``, hidden width ``hidden``,
    compute ``dtype``: the first of :func:`tile_candidates`."""
    return tile_candidates(n_rows, dim, hidden, dtype)[0]


_TUNED: dict = {}  # (kernel, dtype, widths, device) -> the TileConfig timed fastest


def _is_fake(tensor: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return is_fake(tensor)


def tuning_enabled(tensor: torch.Tensor) -> bool:
    """Whether a launch on ``tensor``'s device may time the configurations: a real CUDA tensor,
    not while ``torch.compile`` traces, a CUDA graph is captured or launches are recorded, and
    not under the interpreter or with ``RGKERN_AUTOTUNE=0``."""
    if interpreter_requested() or os.environ.get(AUTOTUNE_ENV, "1") == "0" or _launch.recording():
        return False
    if not tensor.is_cuda or torch.compiler.is_compiling() or _is_fake(tensor):
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose_tiles(key: tuple, candidates: tuple, trial, tensor: torch.Tensor) -> TileConfig:
    """The configuration of the launches ``key`` names (kernel, dtype, widths; not the rows).

    Where :func:`tuning_enabled`, the first launch of a key times every candidate with
    ``trial(tiles)`` (a launch that writes only scratch buffers: the timing runs each several
    times, and some kernels accumulate into their outputs) and keeps the fastest for the
    process. Elsewhere the one kept earlier, or the default (the first candidate).
    """
    if len(candidates) == 1:
        return candidates[0]
    key = (*key, str(tensor.device))
    choice = _TUNED.get(key)
    if choice is None and tuning_enabled(tensor):
        from triton.testing import do_bench

        times = [do_bench(lambda tiles=tiles: trial(tiles), warmup=5, rep=25) for tiles in candidates]
        choice = _TUNED[key] = candidates[times.index(min(times))]
    return candidates[0] if choice is None else choice


def _launch_with(launch, tiles: TileConfig, candidates: tuple) -> None:
    """``launch(tiles)``; while launches are recorded (:func:`~rgkern.kernels.launch.record_launches`)
    the other candidates are recorded too, not run: the ahead-of-time compile covers them all."""
    if _launch.recording():
        with _launch.record_only():
            for other in candidates:
                if other != tiles:
                    launch(other)
    launch(tiles)


def _dot_tf32(compute_dtype: torch.dtype) -> bool:
    return compute_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


def _dot_upcast(compute_dtype: torch.dtype) -> bool:
    """Half-precision dots as float32 under the interpreter, except while launches are being
    recorded for the ahead-of-time compile, which must compile what a GPU runs."""
    return compute_dtype in (torch.bfloat16, torch.float16) and interpreter_requested() and not _launch.recording()


def activation_shapes(n_rows: int, dim: int, weights: HalfStepWeights, save: bool) -> tuple[tuple, tuple]:
    """Shapes of the ``streams`` and ``hidden`` buffers :func:`coupling_half_step_forward` returns."""
    n_res, n_mlp = weights.n_res, weights.n_mlp
    stream_slots = n_res + 1 if save else 2
    hidden_slots = max(1, n_res * n_mlp if save else min(2, n_res * n_mlp))
    hidden = (hidden_slots, 2, n_rows, weights.hidden) if n_mlp else (1,)
    return (stream_slots, 2, n_rows, dim), hidden


class _Patches(NamedTuple):
    """How a launch addresses images: the patch table ``(P, D)``, P, and the values per image."""

    row_index: torch.Tensor
    num_patches: int
    image_numel: int


def _half_step_constants(dim: int, weights: HalfStepWeights, inverse: bool, gather: bool, scatter: bool, copy: bool,
                         acc: torch.dtype, compute: torch.dtype, tiles: "TileConfig") -> dict:
    """The compile-time arguments the forward and backward half-step kernels share, and the launch options."""
    return dict(
        DIM=dim,
        HIDDEN=weights.hidden,
        HAS_HIDDEN=weights.n_mlp > 0,
        INVERSE=bool(inverse),
        GATHER=gather,
        SCATTER=scatter,
        COPY=copy,
        ACC_FP64=acc == torch.float64,
        DOT_TF32=_dot_tf32(compute),
        DOT_UPCAST=_dot_upcast(compute),
        SERIES_LIMIT=TANH_SERIES_LIMIT[acc],
        BLOCK_ROWS=tiles.block_rows,
        BLOCK_D=tiles.block_d,
        BLOCK_H=tiles.block_h,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        maxnreg=MAX_REGISTERS,
    )


def _launch_forward(x, mask, s_scale, t_scale, weights: HalfStepWeights, inverse: bool, streams, hidden, y, logdet,
                    patches: Optional[_Patches] = None, gather=False, scatter=False, accumulate=False, copy_to=None):
    """:func:`coupling_half_step_fwd_kernel` on ``n_rows = logdet.numel()`` > 0 rows, tiles by :func:`choose_tiles`.

    ``patches`` describes the images that ``x`` (``gather``) and ``y`` (``scatter``) are;
    ``copy_to``: images that the x images are first copied to (needs ``gather``).
    """
    n_rows, dim = logdet.shape[0], mask.shape[0]
    acc = accumulator_dtype(x.dtype)
    compute = weights.w_last.dtype
    w = _present(weights)
    row_index, num_patches, image_numel = patches if patches is not None else (x, 1, dim)

    def launch(tiles, streams=streams, hidden=hidden, y=y, logdet=logdet, copy_to=copy_to):
        launch_kernel(
            coupling_half_step_fwd_kernel,
            (triton.cdiv(n_rows, tiles.block_rows),),
            x, mask, s_scale, t_scale,
            w.w_first, w.b_first, w.slope_first,
            w.w_mid, w.b_mid, w.slope_mid,
            w.w_last, w.b_last, w.slope_last,
            streams, hidden, y, logdet, row_index, x if copy_to is None else copy_to,
            n_rows, weights.n_res, weights.n_mid, streams.shape[0], hidden.shape[0], num_patches, image_numel,
            ACCUMULATE=accumulate,
            **_half_step_constants(dim, weights, inverse, gather, scatter, copy_to is not None, acc, compute, tiles),
        )

    def trial(tiles):
        scratch = [torch.empty_like(t) for t in (streams, hidden, y, logdet)]
        launch(tiles, *scratch, copy_to=None if copy_to is None else torch.empty_like(copy_to))

    candidates = tile_candidates(n_rows, dim, weights.hidden, compute)
    tiles = choose_tiles(("forward", compute, dim, weights.hidden, weights.n_mlp), candidates, trial, x)
    _launch_with(launch, tiles, candidates)


def coupling_half_step_forward(
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    inverse: bool = False,
    save: bool = True,
    empty=torch.empty,
):
    """The fused half-step.

    Args:
        x: rows ``(N, D)`` contiguous; mask, s_scale, t_scale: ``(D,)`` contiguous, x's dtype
            (the scales may be wider); weights: :class:`HalfStepWeights`, contiguous, in the
            compute dtype (x's, or the autocast dtype).
        inverse: the inverse half-step.
        save: keep every activation for :func:`coupling_half_step_backward`.
        empty: allocator with ``torch.empty``'s signature (tests pass a NaN-filling one).
    Returns:
        ``y (N, D)``, ``logdet (N,)`` (float64 for float64 x, else float32), and the
        activations ``streams (n_res + 1, 2, N, D)``, ``hidden (n_res * n_mlp, 2, N, H)`` in the
        compute dtype (fewer slots, reused, without ``save``).
    """
    n_rows, dim = x.shape
    compute = weights.w_last.dtype
    stream_shape, hidden_shape = activation_shapes(n_rows, dim, weights, save)
    y = empty((n_rows, dim), dtype=x.dtype, device=x.device)
    logdet = empty((n_rows,), dtype=accumulator_dtype(x.dtype), device=x.device)
    streams = empty(stream_shape, dtype=compute, device=x.device)
    hidden = empty(hidden_shape, dtype=compute, device=x.device)
    if n_rows > 0:
        _launch_forward(x, mask, s_scale, t_scale, weights, inverse, streams, hidden, y, logdet)
    return y, logdet, streams, hidden


def _present(weights: HalfStepWeights) -> HalfStepWeights:
    """``weights`` with the absent tensors replaced by a present one (the kernels never read them)."""
    return HalfStepWeights(*(weights.w_last if t is None else t for t in weights))


class _PartialLayout(NamedTuple):
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


def _partial_layout(dim: int, weights: HalfStepWeights, pairs: int = 1) -> _PartialLayout:
    n_res, n_mid, n_mlp, hidden = weights.n_res, weights.n_mid, weights.n_mlp, weights.hidden
    sizes = (dim, dim, n_res * 2 * dim if n_mlp else 0, n_mid * n_res * 2 * hidden, n_res * 2 * (hidden if n_mlp else dim))
    starts, start = [], 0
    for size in sizes:
        starts.append(start)
        start += pairs * size
    return _PartialLayout(start, tuple(starts), sizes)


def _backward_tiles(grad_y, grad_logdet, x, mask, s_scale, t_scale, weights: HalfStepWeights, inverse: bool,
                    streams, hidden, grad_x, layout, n_rows: int, patches=None, gather=False, scatter=False,
                    copy_to=None) -> tuple:
    """``(tiles, candidates)`` of :func:`coupling_half_step_bwd_kernel` (:func:`choose_tiles`,
    timed on this launch with scratch outputs); the partial sums' rows depend on the choice."""
    dim, compute, acc = mask.shape[0], weights.w_last.dtype, accumulator_dtype(x.dtype)
    candidates = tile_candidates(n_rows, dim, weights.hidden, compute)

    def trial(tiles):
        partial = torch.empty((triton.cdiv(n_rows, tiles.block_rows), layout.width), dtype=acc, device=x.device)
        scratch = [torch.empty_like(t) for t in (streams, hidden, grad_x)]
        _launch_backward(grad_y, grad_logdet, x, mask, s_scale, t_scale, weights, inverse, streams, hidden, *scratch,
                         partial, layout.offsets(0), n_rows, tiles, (tiles,), patches, gather, scatter,
                         None if copy_to is None else torch.empty_like(copy_to))

    tiles = choose_tiles(("backward", compute, dim, weights.hidden, weights.n_mlp), candidates, trial, x)
    return tiles, candidates


def _launch_backward(grad_y, grad_logdet, x, mask, s_scale, t_scale, weights: HalfStepWeights, inverse: bool,
                     streams, hidden, grad_streams, grad_hidden, grad_x, partial, partial_offsets, n_rows: int,
                     tiles: TileConfig, candidates: tuple, patches: Optional[_Patches] = None, gather=False,
                     scatter=False, copy_to=None):
    """:func:`coupling_half_step_bwd_kernel` on ``n_rows`` > 0 rows, one program per row of ``partial``
    (``tiles`` from :func:`_backward_tiles`).

    ``patches``: the images that ``grad_y`` (``scatter``) and ``x``, ``grad_x`` (``gather``)
    are; ``copy_to``: images that the grad_y images are first copied to (needs ``scatter``).
    """
    dim = mask.shape[0]
    acc = partial.dtype
    compute = weights.w_last.dtype
    w = _present(weights)
    row_index, num_patches, image_numel = patches if patches is not None else (x, 1, dim)

    def launch(tiles):
        launch_kernel(
            coupling_half_step_bwd_kernel,
            (partial.shape[0],),
            grad_y, grad_logdet, x, mask, s_scale, t_scale,
            w.w_first, w.slope_first, w.w_mid, w.slope_mid, w.w_last, w.slope_last,
            streams, hidden, grad_streams, grad_hidden, grad_x, partial, row_index, grad_y if copy_to is None else copy_to,
            n_rows, weights.n_res, weights.n_mid, partial.stride(0), *partial_offsets,
            num_patches, image_numel, grad_logdet.stride(0),
            **_half_step_constants(dim, weights, inverse, gather, scatter, copy_to is not None, acc, compute, tiles),
        )

    _launch_with(launch, tiles, candidates)


def _launch_weight_grads(weights: HalfStepWeights, grads: HalfStepWeights, streams, hidden, grad_streams, grad_hidden,
                         n_rows: int, acc: torch.dtype, accumulate: bool = False) -> None:
    """The weight and bias gradients of every kind of linear into ``grads`` (one launch per kind,
    tiles by :func:`choose_tiles`).

    ``grads``: buffers shaped as the weights (their w and b entries; None where absent);
    ``accumulate``: add to what they hold.
    """
    dim = weights.w_last.shape[-2]
    hidden_width, n_res, n_mlp = weights.hidden, weights.n_res, weights.n_mlp
    compute = weights.w_last.dtype
    flags = dict(ACC_FP64=acc == torch.float64, DOT_TF32=_dot_tf32(compute), DOT_UPCAST=_dot_upcast(compute))

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

        candidates = tile_candidates(n_rows, dim, hidden_width, compute)
        tiles = choose_tiles(("weight_grad", compute, in_w, out_w), candidates,
                             lambda tiles: launch(tiles, torch.empty_like(grad_w), torch.empty_like(grad_b)), grad)
        _launch_with(launch, tiles, candidates)

    if n_mlp:
        kind(streams, grad_hidden, weights.w_first, weights.slope_first, grads.w_first, grads.b_first,
             1, 0, n_mlp, 0, dim, hidden_width)
        kind(hidden, grad_streams, weights.w_last, weights.slope_last, grads.w_last, grads.b_last,
             n_mlp, n_mlp - 1, 1, 1, hidden_width, dim)
    else:
        kind(streams, grad_streams, weights.w_last, weights.slope_last, grads.w_last, grads.b_last, 1, 0, 1, 1, dim, dim)
    if weights.n_mid:
        kind(hidden, grad_hidden, weights.w_mid, weights.slope_mid, grads.w_mid, grads.b_mid,
             n_mlp, 0, n_mlp, 1, hidden_width, hidden_width)


def _weight_grad_buffers(weights: HalfStepWeights, empty, device) -> HalfStepWeights:
    """Buffers for the w and b gradients (None for the slopes, which the partial sums give)."""
    return HalfStepWeights(*(
        None if t is None or name.startswith("slope") else empty(t.shape, dtype=t.dtype, device=device)
        for name, t in zip(HalfStepWeights._fields, weights)
    ))


def _with_slopes(grads: HalfStepWeights, weights: HalfStepWeights, first, mid, last) -> HalfStepWeights:
    """``grads`` with the slope gradients, each shaped and typed as its slope (None where absent)."""
    def shaped(values, like):
        return None if like is None else values.reshape(like.shape).to(like.dtype)

    return grads._replace(slope_first=shaped(first, weights.slope_first), slope_mid=shaped(mid, weights.slope_mid),
                          slope_last=shaped(last, weights.slope_last))


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
    hidden: torch.Tensor,
    empty=torch.empty,
):
    """Gradients of :func:`coupling_half_step_forward` (run with ``save=True``).

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
    compute = weights.w_last.dtype
    layout = _partial_layout(dim, weights)
    grad_x = empty((n_rows, dim), dtype=x.dtype, device=x.device)
    args = (grad_y, grad_logdet, x, mask, s_scale, t_scale, weights, inverse, streams, hidden)
    tiles, candidates = _backward_tiles(*args, grad_x, layout, n_rows) if n_rows > 0 else (None, ())
    programs = max(1, triton.cdiv(n_rows, tiles.block_rows)) if n_rows > 0 else 1
    partial = (torch.zeros if n_rows == 0 else empty)((programs, layout.width), dtype=acc, device=x.device)
    grad_streams = empty(streams.shape, dtype=compute, device=x.device)
    grad_hidden = empty(hidden.shape, dtype=compute, device=x.device)
    grads = _weight_grad_buffers(weights, empty, x.device)
    if n_rows > 0:
        _launch_backward(*args, grad_streams, grad_hidden, grad_x, partial, layout.offsets(0), n_rows, tiles, candidates)
        _launch_weight_grads(weights, grads, streams, hidden, grad_streams, grad_hidden, n_rows, acc)
    else:
        grads = HalfStepWeights(*(None if g is None else g.zero_() for g in grads))
    grad_s, grad_t, first, mid, last = (part[0] for part in layout.split(partial.sum(dim=0), 1))
    return grad_x, grad_s.to(s_scale.dtype), grad_t.to(t_scale.dtype), _with_slopes(grads, weights, first, mid, last)


# --------------------------------------------------------------------------- a whole sublayer
def pair_weights(weights: HalfStepWeights, pair: int) -> HalfStepWeights:
    """Pair ``pair``'s :class:`HalfStepWeights` of a sublayer's stacked weights (leading pair dimension)."""
    return HalfStepWeights(*(None if t is None else t[pair] for t in weights))


def half_step_order(pairs: int, shared: bool, inverse: bool) -> list:
    """``(pair, flipped, use)`` of each half-step of a sublayer, in the order they run.

    Half-step ``2 * block + flipped`` of a sublayer of ``pairs`` networks pairs: pair
    ``2 * block + flipped`` of its own, or ``block`` when ``shared`` (both half-steps of a
    block use one pair; ``use`` = flipped tells them apart, else 0). Reversed when ``inverse``.
    """
    blocks = pairs if shared else pairs // 2
    steps = range(2 * blocks - 1, -1, -1) if inverse else range(2 * blocks)
    return [(step // 2, step % 2, step % 2) if shared else (step, step % 2, 0) for step in steps]


def sublayer_buffer_shapes(batch: int, row_index_shape, pairs: int, weights: HalfStepWeights, shared: bool,
                           keep_rows: bool, keep_activations: bool) -> tuple[tuple, tuple, tuple]:
    """Shapes of the ``rows``, ``streams`` and ``hidden`` buffers :func:`sublayer_couplings_forward` returns."""
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
    empty=torch.empty,
):
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
    Returns:
        ``out`` (images), ``logdet (B,)`` (float64 for float64 images, else float32), ``rows``
        ``(half-steps - 1, B*P, D)`` (input of half-step ``j + 1`` in run order at ``j``),
        ``streams`` and ``hidden``: :func:`activation_shapes` with a leading half-step dimension.
    """
    batch = images.shape[0]
    num_patches, dim = row_index.shape
    n_rows = batch * num_patches
    pairs = s_scale.shape[0]
    order = half_step_order(pairs, shared, inverse)
    acc = accumulator_dtype(images.dtype)
    compute = weights.w_last.dtype
    rows_shape, stream_shape, hidden_shape = sublayer_buffer_shapes(batch, row_index.shape, pairs, weights, shared,
                                                                    keep_rows, keep_activations)
    streams = empty(stream_shape, dtype=compute, device=images.device)
    hidden = empty(hidden_shape, dtype=compute, device=images.device)
    rows = empty(rows_shape, dtype=images.dtype, device=images.device)
    out = empty(images.shape, dtype=images.dtype, device=images.device)
    logdet = empty((n_rows,), dtype=acc, device=images.device)
    if n_rows == 0:
        return out.copy_(images), logdet.new_zeros((batch,)), rows, streams, hidden
    patches = _Patches(row_index, num_patches, images[0].numel())
    covers_all = num_patches * dim == patches.image_numel  # the patches of a sublayer never overlap
    masks = (mask, flipped_mask)
    last = len(order) - 1
    for j, (pair, flipped, _) in enumerate(order):
        x = images if j == 0 else rows[(j - 1) % rows.shape[0]]
        y = out if j == last else rows[j % rows.shape[0]]
        slot = j if keep_activations else 0
        _launch_forward(x, masks[flipped], s_scale[pair], t_scale[pair], pair_weights(weights, pair), inverse,
                        streams[slot], hidden[slot], y, logdet, patches, gather=j == 0, scatter=j == last,
                        accumulate=j > 0, copy_to=out if j == 0 and not covers_all else None)
    return out, logdet.view(batch, num_patches).sum(dim=1), rows, streams, hidden


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
    hidden: torch.Tensor,
    recompute: bool,
    grad_images_needed: bool = True,
    empty=torch.empty,
):
    """Gradients of :func:`sublayer_couplings_forward` (run with ``keep_rows``).

    Args:
        grad_out: images' gradient ``(B, C, L, L)`` contiguous; grad_logdet ``(B,)`` in the
            accumulator dtype, any stride (an expanded one is read as it is);
        recompute: the forward kept no activations (``keep_activations=False``): each
            half-step's are recomputed from its input rows before its backward;
        grad_images_needed: else the pixels no patch covers get no gradient (not copied);
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
    compute = weights.w_last.dtype
    first = pair_weights(weights, 0)
    uses = 2 if shared else 1
    layout = _partial_layout(dim, first, pairs)
    grad_images = empty(images.shape, dtype=images.dtype, device=images.device)
    grad_rows = empty((min(2, len(order) - 1), n_rows, dim), dtype=images.dtype, device=images.device)
    stream_shape, hidden_shape = activation_shapes(n_rows, dim, first, True)
    grad_streams = empty(stream_shape, dtype=compute, device=images.device)
    grad_hidden = empty(hidden_shape, dtype=compute, device=images.device)
    grads = _weight_grad_buffers(weights, empty, images.device)
    if recompute:
        streams, hidden = empty((1,) + stream_shape, dtype=compute, device=images.device), empty(
            (1,) + hidden_shape, dtype=compute, device=images.device)
        scratch_rows = empty((n_rows, dim), dtype=images.dtype, device=images.device)
        scratch_logdet = empty((n_rows,), dtype=acc, device=images.device)
    patches = _Patches(row_index, num_patches, images[0].numel())
    covers_all = num_patches * dim == patches.image_numel
    masks = (mask, flipped_mask)
    last = len(order) - 1
    copy_through = grad_images_needed and not covers_all
    tiles, candidates, programs = None, (), 1
    if n_rows > 0:
        # Timed (where tuning applies) on the first backward launch: the last half-step's.
        pair, flipped, _ = order[last]
        tiles, candidates = _backward_tiles(
            grad_out, grad_logdet, rows[last - 1], masks[flipped], s_scale[pair], t_scale[pair], pair_weights(weights, pair),
            inverse, streams[0 if recompute else last], hidden[0 if recompute else last], grad_rows[0], layout, n_rows,
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
            _launch_forward(x, masks[flipped], s_scale[pair], t_scale[pair], step_weights, inverse, streams[0], hidden[0],
                            scratch_rows, scratch_logdet, patches, gather=j == 0)
        grad_y = grad_out if j == last else grad_rows[j % grad_rows.shape[0]]
        grad_x = grad_images if j == 0 else grad_rows[(j - 1) % grad_rows.shape[0]]
        _launch_backward(grad_y, grad_logdet, x, masks[flipped], s_scale[pair], t_scale[pair], step_weights, inverse,
                         streams[slot], hidden[slot], grad_streams, grad_hidden, grad_x,
                         partial[use * programs:(use + 1) * programs], layout.offsets(pair), n_rows, tiles, candidates,
                         patches, gather=j == 0, scatter=j == last,
                         copy_to=grad_images if j == last and copy_through else None)
        _launch_weight_grads(step_weights, pair_weights(grads, pair), streams[slot], hidden[slot], grad_streams,
                             grad_hidden, n_rows, acc, accumulate=pair in used)
        used.add(pair)
    if n_rows == 0:
        grad_images.copy_(grad_out)
        grads = HalfStepWeights(*(None if g is None else g.zero_() for g in grads))
    grad_s, grad_t, first_slopes, mid_slopes, last_slopes = layout.split(partial.sum(dim=0), pairs)
    return (grad_images, grad_s.to(s_scale.dtype), grad_t.to(t_scale.dtype),
            _with_slopes(grads, weights, first_slopes, mid_slopes, last_slopes))

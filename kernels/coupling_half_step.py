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
  so the reduction is deterministic (no atomics).

Matmuls: ``tl.dot`` on the weights' dtype with float32 accumulation (bfloat16 / float16
under autocast; float32 as TF32 unless ``torch.get_float32_matmul_precision()`` is
"highest"); float64 data multiplies and accumulates in float64. Element-wise math in float32
(float64 for float64 data).
"""
import math
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
    "tile_config",
    "activation_shapes",
    "coupling_half_step_forward",
    "coupling_half_step_backward",
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


# --------------------------------------------------------------------------- kernels
@triton.jit
def coupling_half_step_fwd_kernel(
    x_ptr, mask_ptr, s_scale_ptr, t_scale_ptr,
    w_first_ptr, b_first_ptr, slope_first_ptr,
    w_mid_ptr, b_mid_ptr, slope_mid_ptr,
    w_last_ptr, b_last_ptr, slope_last_ptr,
    streams_ptr, hidden_ptr, y_ptr, logdet_ptr,
    n_rows, n_res, n_mid, stream_slots, hidden_slots,
    DIM: tl.constexpr, HIDDEN: tl.constexpr, HAS_HIDDEN: tl.constexpr, INVERSE: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr, SERIES_LIMIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward of one half-step for a block of rows (see the module docstring).

    x, y ``(n_rows, DIM)``; logdet ``(n_rows,)`` float32 (float64 with ACC_FP64);
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

    # r_0 = x * mask, for both networks.
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = rows[:, None] * DIM + cols[None, :]
        cond = _load(x_ptr + offsets, live, ACC_FP64, False) * _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]
        cond = cond.to(streams_ptr.dtype.element_ty)
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
        x = _load(x_ptr + offsets, live, ACC_FP64, False)
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
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=live)
    tl.store(logdet_ptr + rows, logdet.to(logdet_ptr.dtype.element_ty), mask=row_live)


@triton.jit
def coupling_half_step_bwd_kernel(
    grad_y_ptr, grad_logdet_ptr, x_ptr, mask_ptr, s_scale_ptr, t_scale_ptr,
    w_first_ptr, slope_first_ptr, w_mid_ptr, slope_mid_ptr, w_last_ptr, slope_last_ptr,
    streams_ptr, hidden_ptr, grad_streams_ptr, grad_hidden_ptr, grad_x_ptr, partial_ptr,
    n_rows, n_res, n_mid, partial_width, first_offset, mid_offset, last_offset,
    DIM: tl.constexpr, HIDDEN: tl.constexpr, HAS_HIDDEN: tl.constexpr, INVERSE: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr, SERIES_LIMIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward of one half-step to its rows, for a block of rows.

    grad_y, x, grad_x ``(n_rows, DIM)``; grad_logdet ``(n_rows,)``; streams / hidden: the
    forward's saved activations (``n_res + 1`` and ``n_res * n_mlp`` slots); grad_streams and
    grad_hidden: the same shapes, filled with the gradients of the streams and of every hidden
    linear's output; partial ``(programs, partial_width)`` in the accumulator dtype: row ``pid``
    holds this program's sums of the s_scale ``[0, DIM)`` and t_scale ``[DIM, 2 DIM)``
    gradients and of the slope gradients of the first, mid and last linears at the offsets.
    """
    pid = tl.program_id(0)
    rows, row_live, net_stream, net_hidden = _row_block(pid, n_rows, DIM, HIDDEN, BLOCK_ROWS)
    slot_stream = 2 * net_stream
    slot_hidden = 2 * net_hidden
    n_mlp = n_mid + 1
    partial = partial_ptr + pid.to(tl.int64) * partial_width

    # The coupling: gradients of s_raw and t_raw (into the last stream slot), the direct
    # part of grad_x, the scale-gradient partial sums.
    raw = streams_ptr + slot_stream * n_res
    grad_raw = grad_streams_ptr + slot_stream * n_res
    grad_logdet = _load(grad_logdet_ptr + rows, row_live, ACC_FP64, False)[:, None]
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = rows[:, None] * DIM + cols[None, :]
        grad_y = _load(grad_y_ptr + offsets, live, ACC_FP64, False)
        x = _load(x_ptr + offsets, live, ACC_FP64, False)
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
        tl.store(grad_x_ptr + offsets, (grad_y * scale).to(grad_x_ptr.dtype.element_ty), mask=live)
        tl.store(grad_raw + offsets, (grad_pre_tanh * s_scale).to(grad_streams_ptr.dtype.element_ty), mask=live)
        tl.store(grad_raw + net_stream + offsets, (grad_t * t_scale).to(grad_streams_ptr.dtype.element_ty), mask=live)
        tl.store(partial + cols, tl.sum(grad_pre_tanh * s_raw, axis=0), mask=col_live)
        tl.store(partial + DIM + cols, tl.sum(grad_t * t_raw, axis=0), mask=col_live)
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
        m = _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]
        grad_cond = _load(grad_streams_ptr + offsets, live, ACC_FP64, True)
        grad_cond += _load(grad_streams_ptr + net_stream + offsets, live, ACC_FP64, True)
        grad_x = _load(grad_x_ptr + offsets, live, ACC_FP64, True) + m * grad_cond
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=live)


@triton.jit
def coupling_weight_grad_kernel(
    src_ptr, grad_ptr, slope_ptr, grad_w_ptr, grad_b_ptr,
    n_rows, n_res, src_block_slots, src_shift, grad_block_slots, grad_shift,
    IN_W: tl.constexpr, OUT_W: tl.constexpr, ACC_FP64: tl.constexpr, DOT_TF32: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """Weight and bias gradients of one kind of linear, for all its matrices.

    Grid ``(matrices, cdiv(OUT_W, BLOCK_OUT), cdiv(IN_W, BLOCK_IN))``. Matrix ``q = (m * n_res
    + i) * 2 + net`` (``m``: which mid linear, 0 for first and last) reads its input from slot
    ``i * src_block_slots + m + src_shift`` of src ``(slots, 2, n_rows, IN_W)`` and its output
    gradient from slot ``i * grad_block_slots + m + grad_shift`` of grad ``(slots, 2, n_rows,
    OUT_W)``; slope ``(matrices, IN_W)``. Writes ``grad_w[q] = grad^T @ swish(src)``
    ``(matrices, OUT_W, IN_W)`` and (programs with ``pid(2) == 0``) ``grad_b[q] = sum_rows
    grad`` ``(matrices, OUT_W)``, each tile summed over all rows by one program.
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
    tl.store(grad_w_ptr + q64 * (OUT_W * IN_W) + outs[:, None] * IN_W + ins[None, :], acc.to(grad_w_ptr.dtype.element_ty),
             mask=out_live[:, None] & in_live[None, :])
    if tl.program_id(2) == 0:
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


class TileConfig(NamedTuple):
    """Block sizes of the half-step kernels: rows per program, tile widths over D and H, warps."""

    block_rows: int
    block_d: int
    block_h: int
    num_warps: int


# GPU tiles by compute dtype: rows per program, the widest tile over D and over H, warps.
# tl.dot needs every tile dimension >= 16. Chosen from a sweep of a few configurations on one
# half-step (D = 48, H = 70): there no float32 or bfloat16 kernel spills on sm_90 (float32
# needs 8 warps for that); some smaller test shapes still spill a few bytes, and sm_80 does
# (bench/RESULTS.md). Not measured for speed: no GPU was available.
GPU_TILES = {
    torch.float32: TileConfig(32, 64, 64, 8),
    torch.bfloat16: TileConfig(32, 64, 64, 4),
    torch.float16: TileConfig(32, 64, 64, 4),
    torch.float64: TileConfig(16, 16, 16, 4),
}
# Registers a thread may use (PTX .maxnreg). Without it ptxas picked 64 to 128 for some fused
# specialisations and spilled 4 to 36 B (scripts/compile_kernels.py, 22 of 360 in float32 and
# bfloat16); with it they use what they need (e.g. 92) and none spills. Not timed on a GPU:
# fewer resident programs per SM is the price where a kernel needs many registers.
MAX_REGISTERS = 255
# Under the interpreter each program and loop iteration costs Python time: one tile per width.
INTERPRETER_MAX_TILE = 128
MIN_TILE = 16


def tile_config(n_rows: int, dim: int, hidden: int, dtype: torch.dtype) -> TileConfig:
    """Block sizes for ``n_rows`` rows of width ``dim``, hidden width ``hidden``, compute ``dtype``.

    On a GPU the fixed :data:`GPU_TILES` (narrowed to the widths); under the interpreter
    (outside :func:`~rgkern.kernels.launch.gpu_block_sizes`) as wide as the data allows, up to
    :data:`INTERPRETER_MAX_TILE`. Never depends on ``n_rows`` on a GPU (``torch.compile``
    with dynamic batch sizes must not specialise on it).
    """
    def width(w, cap):
        return max(MIN_TILE, min(cap, triton.next_power_of_2(int(w))))

    if interpreter_requested() and _launch._gpu_block_requests == 0:
        cap = INTERPRETER_MAX_TILE
        return TileConfig(width(n_rows, cap), width(dim, cap), width(hidden, cap), 4)
    gpu = GPU_TILES[dtype]
    return TileConfig(gpu.block_rows, width(dim, gpu.block_d), width(hidden, gpu.block_h), gpu.num_warps)


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
    acc = accumulator_dtype(x.dtype)
    compute = weights.w_last.dtype
    n_res, n_mlp, hidden_width = weights.n_res, weights.n_mlp, weights.hidden
    stream_shape, hidden_shape = activation_shapes(n_rows, dim, weights, save)
    stream_slots, hidden_slots = stream_shape[0], hidden_shape[0]
    y = empty((n_rows, dim), dtype=x.dtype, device=x.device)
    logdet = empty((n_rows,), dtype=acc, device=x.device)
    streams = empty(stream_shape, dtype=compute, device=x.device)
    hidden = empty(hidden_shape, dtype=compute, device=x.device)
    if n_rows > 0:
        tiles = tile_config(n_rows, dim, hidden_width, compute)
        w = _present(weights)
        launch_kernel(
            coupling_half_step_fwd_kernel,
            (triton.cdiv(n_rows, tiles.block_rows),),
            x, mask, s_scale, t_scale,
            w.w_first, w.b_first, w.slope_first,
            w.w_mid, w.b_mid, w.slope_mid,
            w.w_last, w.b_last, w.slope_last,
            streams, hidden, y, logdet,
            n_rows, n_res, weights.n_mid, stream_slots, hidden_slots,
            DIM=dim,
            HIDDEN=hidden_width,
            HAS_HIDDEN=n_mlp > 0,
            INVERSE=bool(inverse),
            ACC_FP64=acc == torch.float64,
            DOT_TF32=_dot_tf32(compute),
            DOT_UPCAST=_dot_upcast(compute),
            SERIES_LIMIT=TANH_SERIES_LIMIT[acc],
            BLOCK_ROWS=tiles.block_rows,
            BLOCK_D=tiles.block_d,
            BLOCK_H=tiles.block_h,
            num_warps=tiles.num_warps,
            maxnreg=MAX_REGISTERS,
        )
    return y, logdet, streams, hidden


def _present(weights: HalfStepWeights) -> HalfStepWeights:
    """``weights`` with the absent tensors replaced by a present one (the kernels never read them)."""
    return HalfStepWeights(*(weights.w_last if t is None else t for t in weights))


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
        grad_y ``(N, D)`` of x's dtype and grad_logdet ``(N,)`` (accumulator dtype),
        contiguous; the rest as passed to and returned by the forward.
    Returns:
        ``grad_x (N, D)``, ``grad_s_scale``, ``grad_t_scale`` ``(D,)`` (the scales' dtype) and a
        :class:`HalfStepWeights` of the weight gradients (None where the weight is absent),
        every reduction over rows deterministic.
    """
    n_rows, dim = x.shape
    acc = accumulator_dtype(x.dtype)
    compute = weights.w_last.dtype
    n_res, n_mid, n_mlp, hidden_width = weights.n_res, weights.n_mid, weights.n_mlp, weights.hidden
    tiles = tile_config(n_rows, dim, hidden_width, compute)
    programs = max(1, triton.cdiv(n_rows, tiles.block_rows))
    last_in = hidden_width if n_mlp else dim
    first_offset = 2 * dim
    mid_offset = first_offset + (n_res * 2 * dim if n_mlp else 0)
    last_offset = mid_offset + n_mid * n_res * 2 * hidden_width
    partial_width = last_offset + n_res * 2 * last_in
    partial = (torch.zeros if n_rows == 0 else empty)((programs, partial_width), dtype=acc, device=x.device)
    grad_x = empty((n_rows, dim), dtype=x.dtype, device=x.device)
    grad_streams = empty(streams.shape, dtype=compute, device=x.device)
    grad_hidden = empty(hidden.shape, dtype=compute, device=x.device)
    flags = dict(ACC_FP64=acc == torch.float64, DOT_TF32=_dot_tf32(compute), DOT_UPCAST=_dot_upcast(compute))
    w = _present(weights)
    if n_rows > 0:
        launch_kernel(
            coupling_half_step_bwd_kernel,
            (programs,),
            grad_y, grad_logdet, x, mask, s_scale, t_scale,
            w.w_first, w.slope_first, w.w_mid, w.slope_mid, w.w_last, w.slope_last,
            streams, hidden, grad_streams, grad_hidden, grad_x, partial,
            n_rows, n_res, n_mid, partial_width, first_offset, mid_offset, last_offset,
            DIM=dim,
            HIDDEN=hidden_width,
            HAS_HIDDEN=n_mlp > 0,
            INVERSE=bool(inverse),
            SERIES_LIMIT=TANH_SERIES_LIMIT[acc],
            BLOCK_ROWS=tiles.block_rows,
            BLOCK_D=tiles.block_d,
            BLOCK_H=tiles.block_h,
            num_warps=tiles.num_warps,
            maxnreg=MAX_REGISTERS,
            **flags,
        )
    sums = partial.sum(dim=0)
    grad_s_scale = sums[:dim].to(s_scale.dtype)
    grad_t_scale = sums[dim:first_offset].to(t_scale.dtype)
    slope_sums = sums[first_offset:].to(weights.slope_last.dtype)

    def weight_grads(src, grad, weight, bias, slopes, src_slots, src_shift, grad_slots, grad_shift, in_w, out_w):
        """Weight and bias gradients of one kind of linear (all its matrices in one launch)."""
        mats = weight.numel() // (in_w * out_w)
        grad_w = empty(weight.shape, dtype=compute, device=x.device)
        grad_b = empty(weight.shape[:-1], dtype=bias.dtype, device=x.device)
        block_out = tiles.block_d if out_w == dim else tiles.block_h
        block_in = tiles.block_d if in_w == dim else tiles.block_h
        if n_rows == 0:
            return grad_w.zero_(), grad_b.zero_()
        launch_kernel(
            coupling_weight_grad_kernel,
            (mats, triton.cdiv(out_w, block_out), triton.cdiv(in_w, block_in)),
            src, grad, slopes, grad_w, grad_b,
            n_rows, n_res, src_slots, src_shift, grad_slots, grad_shift,
            IN_W=in_w,
            OUT_W=out_w,
            BLOCK_ROWS=tiles.block_rows,
            BLOCK_OUT=block_out,
            BLOCK_IN=block_in,
            num_warps=tiles.num_warps,
            maxnreg=MAX_REGISTERS,
            **flags,
        )
        return grad_w, grad_b

    def slope_grad(offset, like):
        return None if like is None else slope_sums[offset - first_offset:offset - first_offset + like.numel()].view(like.shape)

    if n_mlp:
        grad_w_first, grad_b_first = weight_grads(streams, grad_hidden, weights.w_first, weights.b_first, weights.slope_first,
                                                  1, 0, n_mlp, 0, dim, hidden_width)
        grad_w_last, grad_b_last = weight_grads(hidden, grad_streams, weights.w_last, weights.b_last, weights.slope_last,
                                                n_mlp, n_mlp - 1, 1, 1, hidden_width, dim)
    else:
        grad_w_first = grad_b_first = None
        grad_w_last, grad_b_last = weight_grads(streams, grad_streams, weights.w_last, weights.b_last, weights.slope_last,
                                                1, 0, 1, 1, dim, dim)
    if n_mid:
        grad_w_mid, grad_b_mid = weight_grads(hidden, grad_hidden, weights.w_mid, weights.b_mid, weights.slope_mid,
                                              n_mlp, 0, n_mlp, 1, hidden_width, hidden_width)
    else:
        grad_w_mid = grad_b_mid = None
    grads = HalfStepWeights(
        grad_w_first, grad_b_first, slope_grad(first_offset, weights.slope_first),
        grad_w_mid, grad_b_mid, slope_grad(mid_offset, weights.slope_mid),
        grad_w_last, grad_b_last, slope_grad(last_offset, weights.slope_last),
    )
    return grad_x, grad_s_scale, grad_t_scale, grads

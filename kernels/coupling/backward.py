"""The backward kernels of the fused coupling half-step: rows, then weights (see :mod:`rgkern.kernels.coupling`)."""
import triton
import triton.language as tl

from .device import (
    _copy_share,
    _dot,
    _entries,
    _linear_input_grad,
    _load,
    _load_entries,
    _row_block,
    _sigmoid,
    _tanh_and_derivative,
    _zeros,
)


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
    row_ids, row_live, net_stream, net_hidden = _row_block(pid, n_rows, DIM, HIDDEN, BLOCK_ROWS)
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
    grad_logdet = _load(grad_logdet_ptr + (row_ids // num_patches) * grad_logdet_stride, row_live, ACC_FP64, False)[:, None]
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = row_ids[:, None] * DIM + cols[None, :]
        y_offsets, y_inside = _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM, SCATTER)
        x_offsets, x_inside = _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
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
                                   grad_out, partial + last_offset + mat * HIDDEN, row_ids, row_live,
                                   HIDDEN, DIM, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_H)
                for back_mid in range(n_mid):
                    m = n_mid - 1 - back_mid
                    slot = (i * n_mlp + m).to(tl.int64)
                    mid = (m * n_res * 2 + mat).to(tl.int64)
                    _linear_input_grad(grad_hidden_ptr + (slot + 1) * slot_hidden + net * net_hidden,
                                       w_mid_ptr + mid * (HIDDEN * HIDDEN), hidden_ptr + slot * slot_hidden + net * net_hidden,
                                       slope_mid_ptr + mid * HIDDEN, grad_hidden_ptr + slot * slot_hidden + net * net_hidden,
                                       grad_out, partial + mid_offset + mid * HIDDEN, row_ids, row_live,
                                       HIDDEN, HIDDEN, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_H)
                slot = (i * n_mlp).to(tl.int64)
                _linear_input_grad(grad_hidden_ptr + slot * slot_hidden + net * net_hidden, w_first_ptr + mat * (HIDDEN * DIM),
                                   stream_in, slope_first_ptr + mat * DIM, grad_in, grad_out,
                                   partial + first_offset + mat * DIM, row_ids, row_live,
                                   DIM, HIDDEN, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_D)
            else:
                _linear_input_grad(grad_out, w_last_ptr + mat * (DIM * DIM), stream_in, slope_last_ptr + mat * DIM,
                                   grad_in, grad_out, partial + last_offset + mat * DIM, row_ids, row_live,
                                   DIM, DIM, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_D)

    # The conditioner r_0 = x * mask feeds both networks.
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = row_ids[:, None] * DIM + cols[None, :]
        x_offsets, x_inside = _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
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


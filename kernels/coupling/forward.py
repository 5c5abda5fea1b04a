"""The forward kernel of the fused coupling half-step (see :mod:`rgkern.kernels.coupling`)."""
import triton
import triton.language as tl

from .device import _copy_share, _entries, _linear_forward, _load, _load_entries, _row_block, _tanh, _zeros


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
    row_ids, row_live, net_stream, net_hidden = _row_block(pid, n_rows, DIM, HIDDEN, BLOCK_ROWS)
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
        x_offsets, x_inside = _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
        x = _load_entries(x_ptr, x_offsets, x_inside, live, ACC_FP64)
        cond = (x * _load(mask_ptr + cols, col_live, ACC_FP64, False)[None, :]).to(streams_ptr.dtype.element_ty)
        offsets = row_ids[:, None] * DIM + cols[None, :]
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
                                slope_first_ptr + mat * DIM, h_out, h_out, row_ids, row_live,
                                DIM, HIDDEN, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_D)
                for m in range(n_mid):
                    h_in = h_out
                    h_out = hidden_ptr + ((i * n_mlp + m + 1) % hidden_slots).to(tl.int64) * slot_hidden + net * net_hidden
                    mid = (m * n_res * 2 + mat).to(tl.int64)
                    _linear_forward(h_in, w_mid_ptr + mid * (HIDDEN * HIDDEN), b_mid_ptr + mid * HIDDEN,
                                    slope_mid_ptr + mid * HIDDEN, h_out, h_out, row_ids, row_live,
                                    HIDDEN, HIDDEN, False, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_H, BLOCK_H)
                _linear_forward(h_out, w_last_ptr + mat * (DIM * HIDDEN), b_last_ptr + mat * DIM,
                                slope_last_ptr + mat * HIDDEN, stream_out, stream_in, row_ids, row_live,
                                HIDDEN, DIM, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_H)
            else:
                _linear_forward(stream_in, w_last_ptr + mat * (DIM * DIM), b_last_ptr + mat * DIM,
                                slope_last_ptr + mat * DIM, stream_out, stream_in, row_ids, row_live,
                                DIM, DIM, True, ACC_FP64, DOT_TF32, DOT_UPCAST, BLOCK_ROWS, BLOCK_D, BLOCK_D)

    # The coupling on the final streams (s_raw: network 0, t_raw: network 1).
    raw = streams_ptr + slot_stream * (n_res % stream_slots)
    logdet = tl.sum(_zeros(BLOCK_ROWS, BLOCK_D, ACC_FP64), axis=1)
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_live = cols < DIM
        live = row_live[:, None] & col_live[None, :]
        offsets = row_ids[:, None] * DIM + cols[None, :]
        x_offsets, x_inside = _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM, GATHER)
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
        y_offsets, y_inside = _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM, SCATTER)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=y_inside)
    if ACCUMULATE:
        # Earlier half-steps' sum first, as ``logdet + ld`` on the host would add them.
        logdet = _load(logdet_ptr + row_ids, row_live, ACC_FP64, False) + logdet
    tl.store(logdet_ptr + row_ids, logdet.to(logdet_ptr.dtype.element_ty), mask=row_live)


"""The affine coupling half-step, fused: masks, tanh, learned scales, exp and the log-det.

With the checkerboard ``mask`` ``m`` (1 on the conditioning half), ``keep = 1 - m``,
``s = tanh(s_scale * s_raw)`` and ``t = t_scale * t_raw``::

    forward:  y = m*x + keep * (x * exp(s) + t),    logdet =  sum_d keep * s
    inverse:  y = m*x + keep * (x - t) * exp(-s),   logdet = -sum_d keep * s

One program handles a block of rows ``(BLOCK_ROWS, BLOCK_DIM)`` (half as many rows for
float64: ``TILE_ELEMENTS``); the per-row log-det is reduced inside the program (float32,
float64 for float64 data). The backward kernel produces the gradients wrt ``x``, ``s_raw``,
``t_raw`` and, per program, partial sums over its rows of the ``s_scale``/``t_scale``
gradients; the host sums the partials with ``torch.sum`` (deterministic: no atomics).

All math runs in float32 for float32/float16/bfloat16 data and in float64 for float64 data.
``tanh`` is built from ``tl.exp`` (libdevice ``tanh`` is not portable: it is missing in the
interpreter): an odd Taylor polynomial near 0, ``(1 - e^{-2|a|}) / (1 + e^{-2|a|})`` elsewhere,
so the result keeps full relative precision for small arguments.
"""
import torch
import triton
import triton.language as tl

from rgkern.core.precision import accumulator_dtype

from .coupling.device import TANH_SERIES_LIMIT, _load_tile, _tanh, _tanh_and_derivative
from .launch import GPU_TILE_ELEMENTS, launch_kernel, row_launch_shape

__all__ = [
    "affine_coupling_fwd_kernel",
    "affine_coupling_bwd_kernel",
    "affine_coupling_forward",
    "affine_coupling_backward",
    "TANH_SERIES_LIMIT",
    "TILE_ELEMENTS",
]

# Elements of a tile on a GPU, by accumulator dtype. A float64 value takes two registers, so
# float64 tiles hold half as many (the same registers per tile): at 2,048 the float64 backward
# needs more than the 255 registers a thread has and spills 96-216 bytes per thread, the
# forward uses 238-252 (sm_80 and sm_90, Triton 3.6 and 3.9; bench/RESULTS.md).
TILE_ELEMENTS = {torch.float32: GPU_TILE_ELEMENTS, torch.float64: GPU_TILE_ELEMENTS // 2}



@triton.jit
def affine_coupling_fwd_kernel(
    x_ptr,
    s_raw_ptr,
    t_raw_ptr,
    s_scale_ptr,
    t_scale_ptr,
    mask_ptr,
    y_ptr,
    logdet_ptr,
    n_rows,
    DIM: tl.constexpr,
    INVERSE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    SERIES_LIMIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """One coupling half-step (forward or inverse) on a block of rows.

    x, s_raw, t_raw, y: ``(n_rows, DIM)``; s_scale, t_scale, mask: ``(DIM,)``, all one dtype;
    logdet: ``(n_rows,)`` float32 (float64 when ACC_FP64). Writes every live element of y
    and every live row of logdet.
    """
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_DIM)
    row_live = row < n_rows
    col_live = col < DIM
    live = row_live[:, None] & col_live[None, :]
    offsets = row[:, None] * DIM + col[None, :]

    x = _load_tile(x_ptr, offsets, live, ACC_FP64)
    s_raw = _load_tile(s_raw_ptr, offsets, live, ACC_FP64)
    t_raw = _load_tile(t_raw_ptr, offsets, live, ACC_FP64)
    s_scale = _load_tile(s_scale_ptr, col, col_live, ACC_FP64)[None, :]
    t_scale = _load_tile(t_scale_ptr, col, col_live, ACC_FP64)[None, :]
    m = _load_tile(mask_ptr, col, col_live, ACC_FP64)[None, :]
    keep = tl.where(col_live[None, :], 1 - m, 0)  # padded columns add nothing to the log-det

    s = _tanh(s_scale * s_raw, SERIES_LIMIT)
    t = t_scale * t_raw
    if INVERSE:
        y = m * x + keep * ((x - t) * tl.exp(-s))
        logdet = -tl.sum(keep * s, axis=1)
    else:
        y = m * x + keep * (x * tl.exp(s) + t)
        logdet = tl.sum(keep * s, axis=1)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=live)
    tl.store(logdet_ptr + row, logdet.to(logdet_ptr.dtype.element_ty), mask=row_live)


@triton.jit
def affine_coupling_bwd_kernel(
    grad_y_ptr,
    grad_logdet_ptr,
    x_ptr,
    s_raw_ptr,
    t_raw_ptr,
    s_scale_ptr,
    t_scale_ptr,
    mask_ptr,
    grad_x_ptr,
    grad_s_raw_ptr,
    grad_t_raw_ptr,
    partial_s_scale_ptr,
    partial_t_scale_ptr,
    n_rows,
    DIM: tl.constexpr,
    INVERSE: tl.constexpr,
    ACC_FP64: tl.constexpr,
    SERIES_LIMIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    """Backward of one coupling half-step on a block of rows (recomputes s, t, exp).

    grad_y, x, s_raw, t_raw, grad_x, grad_s_raw, grad_t_raw: ``(n_rows, DIM)``;
    grad_logdet: ``(n_rows,)`` float32/float64; s_scale, t_scale, mask: ``(DIM,)``;
    partial_s_scale, partial_t_scale: ``(num_programs, DIM)`` in the accumulator dtype,
    row ``pid`` = this program's sum over its rows of the scale gradients.
    """
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_DIM)
    row_live = row < n_rows
    col_live = col < DIM
    live = row_live[:, None] & col_live[None, :]
    offsets = row[:, None] * DIM + col[None, :]

    grad_y = _load_tile(grad_y_ptr, offsets, live, ACC_FP64)
    grad_logdet = _load_tile(grad_logdet_ptr, row, row_live, ACC_FP64)[:, None]
    x = _load_tile(x_ptr, offsets, live, ACC_FP64)
    s_raw = _load_tile(s_raw_ptr, offsets, live, ACC_FP64)
    t_raw = _load_tile(t_raw_ptr, offsets, live, ACC_FP64)
    s_scale = _load_tile(s_scale_ptr, col, col_live, ACC_FP64)[None, :]
    t_scale = _load_tile(t_scale_ptr, col, col_live, ACC_FP64)[None, :]
    m = _load_tile(mask_ptr, col, col_live, ACC_FP64)[None, :]
    keep = tl.where(col_live[None, :], 1 - m, 0)

    s, tanh_slope = _tanh_and_derivative(s_scale * s_raw, SERIES_LIMIT)
    if INVERSE:
        scale = tl.exp(-s)
        shifted = (x - t_scale * t_raw) * scale
        grad_s = -keep * (grad_y * shifted + grad_logdet)
        grad_t = -keep * grad_y * scale
    else:
        scale = tl.exp(s)
        grad_s = keep * (grad_y * x * scale + grad_logdet)
        grad_t = keep * grad_y
    grad_x = grad_y * (m + keep * scale)
    grad_pre_tanh = grad_s * tanh_slope  # d tanh(a) / da = 1 - tanh(a)^2

    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=live)
    tl.store(grad_s_raw_ptr + offsets, (grad_pre_tanh * s_scale).to(grad_s_raw_ptr.dtype.element_ty), mask=live)
    tl.store(grad_t_raw_ptr + offsets, (grad_t * t_scale).to(grad_t_raw_ptr.dtype.element_ty), mask=live)
    # Dead rows loaded zeros (grad_y = grad_logdet = 0), so they add nothing to the sums.
    partial_s = tl.sum(grad_pre_tanh * s_raw, axis=0)
    partial_t = tl.sum(grad_t * t_raw, axis=0)
    tl.store(partial_s_scale_ptr + pid * DIM + col, partial_s, mask=col_live)
    tl.store(partial_t_scale_ptr + pid * DIM + col, partial_t, mask=col_live)


def affine_coupling_forward(
    x: torch.Tensor,
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    mask: torch.Tensor,
    inverse: bool = False,
    out: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused coupling half-step.

    Args:
        x, s_raw, t_raw: ``(N, D)`` contiguous, one float dtype, one device.
        s_scale, t_scale, mask: ``(D,)`` contiguous, same dtype and device.
        inverse: apply the inverse half-step.
        out: optional ``(y, logdet)`` buffers (tests pass NaN-filled ones).
    Returns:
        ``y`` ``(N, D)`` of ``x``'s dtype and ``logdet`` ``(N,)``: float64 for float64 ``x``,
        float32 otherwise.
    """
    n_rows, dim = x.shape
    acc = accumulator_dtype(x.dtype)
    if out is None:
        y = torch.empty_like(x)
        logdet = torch.empty((n_rows,), dtype=acc, device=x.device)
    else:
        y, logdet = out
    if n_rows > 0:
        width, block_rows, programs = row_launch_shape(n_rows, dim, TILE_ELEMENTS[acc])
        launch_kernel(
            affine_coupling_fwd_kernel,
            (programs,),
            x,
            s_raw,
            t_raw,
            s_scale,
            t_scale,
            mask,
            y,
            logdet,
            n_rows,
            DIM=dim,
            INVERSE=bool(inverse),
            ACC_FP64=acc == torch.float64,
            SERIES_LIMIT=TANH_SERIES_LIMIT[acc],
            BLOCK_ROWS=block_rows,
            BLOCK_DIM=width,
        )
    return y, logdet


def affine_coupling_backward(
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    x: torch.Tensor,
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    mask: torch.Tensor,
    inverse: bool = False,
    out: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`affine_coupling_forward` (the mask gets none: it is a constant).

    Args:
        grad_y: ``(N, D)`` contiguous, dtype of ``x``; grad_logdet: ``(N,)`` contiguous,
            float32 (float64 for float64 ``x``); the rest as in the forward.
        out: optional ``(grad_x, grad_s_raw, grad_t_raw)`` buffers.
    Returns:
        ``grad_x``, ``grad_s_raw``, ``grad_t_raw`` ``(N, D)`` and ``grad_s_scale``,
        ``grad_t_scale`` ``(D,)``, all of ``x``'s dtype; the scale gradients are summed over
        rows in the accumulator dtype, per program in the kernel, then across programs here.
    """
    n_rows, dim = x.shape
    acc = accumulator_dtype(x.dtype)
    if out is None:
        grad_x, grad_s_raw, grad_t_raw = (torch.empty_like(x) for _ in range(3))
    else:
        grad_x, grad_s_raw, grad_t_raw = out
    width, block_rows, programs = row_launch_shape(n_rows, dim, TILE_ELEMENTS[acc])
    partial_s_scale = torch.zeros((max(programs, 1), dim), dtype=acc, device=x.device)
    partial_t_scale = torch.zeros((max(programs, 1), dim), dtype=acc, device=x.device)
    if n_rows > 0:
        launch_kernel(
            affine_coupling_bwd_kernel,
            (programs,),
            grad_y,
            grad_logdet,
            x,
            s_raw,
            t_raw,
            s_scale,
            t_scale,
            mask,
            grad_x,
            grad_s_raw,
            grad_t_raw,
            partial_s_scale,
            partial_t_scale,
            n_rows,
            DIM=dim,
            INVERSE=bool(inverse),
            ACC_FP64=acc == torch.float64,
            SERIES_LIMIT=TANH_SERIES_LIMIT[acc],
            BLOCK_ROWS=block_rows,
            BLOCK_DIM=width,
        )
    grad_s_scale = partial_s_scale.sum(dim=0).to(x.dtype)
    grad_t_scale = partial_t_scale.sum(dim=0).to(x.dtype)
    return grad_x, grad_s_raw, grad_t_raw, grad_s_scale, grad_t_scale

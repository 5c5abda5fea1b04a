"""Device helpers of the fused coupling kernels: dots, loads, Swish, tanh, one linear forward and back.

Every helper works on one program's block of rows (``row_ids``, int64); float64 data computes in float64, every
other dtype in float32 (``ACC_FP64``).
"""
import math

import torch
import triton
import triton.language as tl

# The residual's 1/sqrt(2); a constexpr so that the kernels may read it.
SQRT_HALF = tl.constexpr(1 / math.sqrt(2))


# |a| below which tanh(a) uses its Taylor polynomial to a**9 (truncation 0.0089 |a|**10 relative):
# 0.25 keeps float32 at ~1e-8, 0.04 keeps float64 at ~1e-16; above it, the exp formula loses at
# most ~eps / |a| to cancellation.
TANH_SERIES_LIMIT = {torch.float64: 0.04, torch.float32: 0.25}


@triton.jit
def _tanh(a, SERIES_LIMIT: tl.constexpr):
    """tanh of a float32/float64 tile from ``tl.exp``; integer constants keep float64 exact."""
    a2 = a * a
    # a * (1 - a^2/3 + 2a^4/15 - 17a^6/315 + 62a^8/2835), over the common denominator 2835.
    series = a * (2835 + a2 * (-945 + a2 * (378 + a2 * (-153 + a2 * 62)))) / 2835
    decay = tl.exp(-2 * tl.abs(a))
    magnitude = (1 - decay) / (1 + decay)
    by_exp = tl.where(a < 0, -magnitude, magnitude)
    return tl.where(tl.abs(a) < SERIES_LIMIT, series, by_exp)


@triton.jit
def _tanh_and_derivative(a, SERIES_LIMIT: tl.constexpr):
    """``tanh(a)`` and its derivative ``1 - tanh(a)**2``, the latter from the exponential itself.

    ``1 - t*t`` from a tanh ``t`` with relative error ``e`` has relative error
    ``2 e t**2 / (1 - t**2)``: 26 e at |a| = 2, 370 e at |a| = 3.3, so a float32 gradient through
    a saturated tanh lost digits (the float32 model-level gradients of the s scales showed it).
    ``4 q / (1 + q)**2`` with ``q = exp(-2|a|)`` (the exp ``_tanh`` computes anyway) keeps a few
    eps everywhere; in the series range ``1 - t*t`` has no cancellation.
    """
    t = _tanh(a, SERIES_LIMIT)
    decay = tl.exp(-2 * tl.abs(a))  # the same exp as in _tanh: compiled once
    by_exp = 4 * decay / ((1 + decay) * (1 + decay))
    return t, tl.where(tl.abs(a) < SERIES_LIMIT, 1 - t * t, by_exp)


@triton.jit
def _load_tile(ptr, offsets, live, ACC_FP64: tl.constexpr):
    values = tl.load(ptr + offsets, mask=live, other=0)
    if ACC_FP64:
        values = values.to(tl.float64)
    else:
        values = values.to(tl.float32)
    return values



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
    src, w, b, slope, dst, residual, row_ids, row_live,
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
            u = _load(src + row_ids[:, None] * IN_W + ks[None, :], row_live[:, None] & k_live[None, :], ACC_FP64, True)
            beta = _load(slope + ks, k_live, ACC_FP64, False)
            a = u * _sigmoid(beta[None, :] * u)
            # The weights may be wider than the activations (float32 under autocast): cast as loaded.
            wt = tl.load(w + cols[None, :] * IN_W + ks[:, None], mask=k_live[:, None] & col_live[None, :], other=0.0)
            wt = wt.to(dst.dtype.element_ty)
            acc = _dot(a.to(wt.dtype), wt, acc, ACC_FP64, DOT_TF32, DOT_UPCAST)
        out = acc + _load(b + cols, col_live, ACC_FP64, False)[None, :]
        offsets = row_ids[:, None] * OUT_W + cols[None, :]
        live = row_live[:, None] & col_live[None, :]
        if RESIDUAL:
            out += SQRT_HALF * _load(residual + offsets, live, ACC_FP64, True)
        tl.store(dst + offsets, out.to(dst.dtype.element_ty), mask=live)
    tl.debug_barrier()  # the next linear reads these rows in other threads' tiles


@triton.jit
def _linear_input_grad(
    grad_out, w, src, slope, grad_src, grad_residual, partial, row_ids, row_live,
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
            g = tl.load(grad_out + row_ids[:, None] * OUT_W + os[None, :], mask=row_live[:, None] & o_live[None, :],
                        other=0.0, cache_modifier=".cg")
            wt = tl.load(w + os[:, None] * IN_W + ks[None, :], mask=o_live[:, None] & k_live[None, :], other=0.0)
            acc = _dot(g, wt.to(g.dtype), acc, ACC_FP64, DOT_TF32, DOT_UPCAST)
        offsets = row_ids[:, None] * IN_W + ks[None, :]
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
    """Program ``pid``'s row ids (int64), which are live, and the int64 strides of one network in
    the ``(slots, 2, n_rows, DIM)`` stream and ``(slots, 2, n_rows, HIDDEN)`` hidden buffers."""
    row_ids = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return row_ids, row_ids < n_rows, tl.full([], DIM, tl.int64) * n_rows, tl.full([], HIDDEN, tl.int64) * n_rows


@triton.jit
def _entries(row_ids, cols, live, row_index_ptr, num_patches, image_numel, DIM: tl.constexpr, IMAGES: tl.constexpr):
    """Offsets of the row entries ``(row_ids, cols)`` and which of them may be touched.

    Plain rows: row-major ``(n_rows, DIM)``. ``IMAGES``: elements of images ``(B, image_numel)``
    through the patch table ``row_index (num_patches, DIM)``, row ``b * num_patches + p`` being
    patch ``p`` of image ``b``; an index outside ``[0, image_numel)`` is never touched.
    """
    if IMAGES:
        sample = row_ids // num_patches
        patch = row_ids - sample * num_patches
        index = tl.load(row_index_ptr + patch[:, None] * DIM + cols[None, :], mask=live, other=0).to(tl.int64)
        offsets = sample[:, None] * image_numel + index
        inside = live & (index >= 0) & (index < image_numel)
    else:
        offsets = row_ids[:, None] * DIM + cols[None, :]
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


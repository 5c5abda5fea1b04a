"""Pure-PyTorch reference ops: the slow, obviously-right path every kernel is tested against.

Each function here has the signature of its kernel counterpart (``rgkern.core.ops``) and is
differentiable with plain autograd. They take raw tensors and index tables from
:mod:`rgkern.core.geometry`, never a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .precision import accumulator_dtype

if TYPE_CHECKING:
    from ..kernels.coupling.weights import HalfStepWeights

__all__ = ["gather_patches", "scatter_patches", "affine_coupling", "affine_update", "coupling_half_step", "sublayer_couplings"]


def gather_patches(x: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Gather the patches of one sublayer into coupling rows.

    Args:
        x: image ``(B, C, L, L)``.
        row_index: LongTensor ``(P, D)`` from :meth:`Geometry.row_index`.
    Returns:
        rows ``(B*P, D)``, patch ``p`` of sample ``b`` at row ``b*P + p``.
    """
    batch = x.shape[0]
    num_patches, dim = row_index.shape
    return x.reshape(batch, -1)[:, row_index.flatten()].reshape(batch * num_patches, dim)


def scatter_patches(x: torch.Tensor, rows: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Write coupling rows back into a copy of ``x`` (inverse of :func:`gather_patches`).

    Pixels not covered by the sublayer keep their value from ``x``.

    Args:
        x: image ``(B, C, L, L)``; rows: ``(B*P, D)``; row_index: ``(P, D)``.
    Returns:
        image ``(B, C, L, L)``.
    """
    batch = x.shape[0]
    flat = x.reshape(batch, -1).index_copy(1, row_index.flatten(), rows.reshape(batch, -1))
    return flat.view_as(x)


def affine_coupling(
    x: torch.Tensor,
    s_raw: torch.Tensor,
    t_raw: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    mask: torch.Tensor,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One affine coupling half-step on patch rows.

    ``s = tanh(s_scale * s_raw)``, ``t = t_scale * t_raw`` and, with the checkerboard
    ``mask`` (1 on the conditioning half that ``s_raw``, ``t_raw`` were computed from)::

        forward:  y = m*x + (1-m) * (x * exp(s) + t),    logdet =  sum((1-m) * s)
        inverse:  y = m*x + (1-m) * (x - t) * exp(-s),   logdet = -sum((1-m) * s)

    Args:
        x, s_raw, t_raw: ``(N, D)``; s_scale, t_scale, mask: ``(D,)``.
    Returns:
        y ``(N, D)`` and the per-row log-det ``(N,)``, float64 for float64 ``x``, else float32.
    """
    # With the mask folded into the scales, s and t are exactly 0 on the conditioning half
    # (tanh(0) = 0), where x * exp(0) + 0 = x exactly: the formulas above in fewer passes.
    keep = 1 - mask
    return affine_update(x, (s_scale * keep) * s_raw, (t_scale * keep) * t_raw, inverse)


def affine_update(
    x: torch.Tensor, s_pre: torch.Tensor, t: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine update of the entries a coupling half-step changes, from its scaled ``s`` and ``t``.

    With ``s = tanh(s_pre)``::

        forward:  y = x * exp(s) + t,      logdet =  sum(s)
        inverse:  y = (x - t) * exp(-s),   logdet = -sum(s)

    :func:`affine_coupling` is this with ``s_pre = s_scale * s_raw`` and ``t = t_scale *
    t_raw``, the mask folded into the scales; the model's torch path calls it on the updated
    half of the rows alone, the scales folded into its networks' last linears (``Sublayer``).

    Args:
        x, s_pre, t: ``(N, W)``.
    Returns:
        y ``(N, W)`` and the per-row log-det ``(N,)``, float64 for float64 ``x``, else float32.
    """
    s = torch.tanh(s_pre)
    logdet = s.to(accumulator_dtype(x.dtype)).sum(dim=1)
    if inverse:
        return (x - t) * torch.exp(-s), -logdet
    return torch.addcmul(t, x, torch.exp(s)), logdet


def coupling_half_step(
    x: torch.Tensor,
    mask: torch.Tensor,
    s_scale: torch.Tensor,
    t_scale: torch.Tensor,
    weights: HalfStepWeights,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupling half-step with its s and t residual MLPs, from the stacked weights.

    The math and weight layout of :mod:`rgkern.kernels.coupling` (``weights`` is its
    ``HalfStepWeights``: weight-normalised, the last linear of each block carrying the
    residual's 1/sqrt(2)); the networks run in the weights' dtype (biases and slopes may be wider). x ``(N, D)``; mask,
    s_scale, t_scale ``(D,)``. Returns y ``(N, D)`` and the per-row log-det ``(N,)``.
    """
    w_first, b_first, slope_first, w_mid, b_mid, slope_mid, w_last, b_last, slope_last = weights
    layers = []
    if w_first is not None:
        layers.append((w_first, b_first, slope_first))
        for m in range(0 if w_mid is None else w_mid.shape[0]):
            layers.append((w_mid[m], b_mid[m], slope_mid[m]))
    layers.append((w_last, b_last, slope_last))
    raw = []
    for net in range(2):
        r = (x * mask).to(w_last.dtype)
        for i in range(w_last.shape[0]):
            h = r
            for j, (w, b, slope) in enumerate(layers):
                a = (h * torch.sigmoid(slope[i, net] * h)).to(w.dtype)
                h = (a @ w[i, net].T + b[i, net]).to(w.dtype)
            r = r * (2 ** -0.5) + h
        raw.append(r)
    return affine_coupling(x, raw[0], raw[1], s_scale, t_scale, mask, inverse)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every coupling half-step of a sublayer on whole images: gather, the half-steps, scatter.

    Half-step ``2 * block + flipped`` (mask ``flipped_mask`` when flipped) uses pair ``block``
    of the networks when ``shared``, else pair ``2 * block + flipped``; ``s_scale``, ``t_scale``
    ``(pairs, D)`` and the nine ``weights`` (the layout of :func:`coupling_half_step`) carry a
    leading pair dimension. Blocks in order, or in reverse with each half-step inverted.
    ``recompute`` (activation checkpointing in the kernel path) changes nothing here. Returns
    the new images and the per-image log-det ``(B,)``.
    """
    rows = gather_patches(images, row_index)
    pairs = s_scale.shape[0]
    blocks = range(pairs if shared else pairs // 2)
    logdet = rows.new_zeros(rows.shape[0], dtype=accumulator_dtype(rows.dtype))
    for block in reversed(blocks) if inverse else blocks:
        for flipped in (1, 0) if inverse else (0, 1):
            pair = block if shared else 2 * block + flipped
            pair_weights = tuple(None if w is None else w[pair] for w in weights)
            rows, ld = coupling_half_step(rows, flipped_mask if flipped else mask, s_scale[pair], t_scale[pair],
                                          pair_weights, inverse)
            logdet = logdet + ld
    return scatter_patches(images, rows, row_index), logdet.view(images.shape[0], -1).sum(dim=1)

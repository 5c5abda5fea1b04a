"""Between 8-bit images and model space: dequantisation, squeeze and logit, with the log-det.

``preprocess`` maps uint8 images ``x`` to ``y = logit(alpha + (1 - 2*alpha) * (x + u) / 256)``
with ``u ~ U[0, 1)`` (dequantisation noise) and ``alpha = 0.05``. Its log-det is taken with
respect to the dequantised data ``x + u`` in ``[0, 256)``, so that

    bits/dim = -(log p_model(y) + logdet_preprocess) / (num_dims * ln 2)

is the usual figure for 8-bit data, comparable with the paper's tables.
"""
from __future__ import annotations

import math

import torch

from .errors import InputError, InputTypeError

__all__ = ["ALPHA", "preprocess", "postprocess", "bits_per_dim"]

ALPHA = 0.05


def preprocess(images: torch.Tensor, generator: torch.Generator | None = None, dequantize: bool = True,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(B, C, L, L)`` -> ``(y, logdet)`` with ``y`` in model space and ``logdet (B,)``.

    ``dequantize=False`` uses the bin centres (``u = 1/2``) for deterministic evaluation.
    """
    if not isinstance(images, torch.Tensor):
        raise InputTypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise InputTypeError(f"images must be uint8 with values 0..255, got dtype {images.dtype}")
    if images.dim() != 4:
        raise InputError(f"images must be 4-D (B, C, L, L), got shape {tuple(images.shape)}")
    x = images.to(dtype)
    if dequantize:
        x = x + torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)
    else:
        x = x + 0.5
    p = ALPHA + (1 - 2 * ALPHA) * x / 256.0
    y = torch.log(p) - torch.log1p(-p)
    # dy/dx = (1 - 2 alpha) / 256 / (p (1 - p))
    log_jac = math.log((1 - 2 * ALPHA) / 256.0) - torch.log(p) - torch.log1p(-p)
    return y, log_jac.flatten(1).sum(dim=1)


def postprocess(y: torch.Tensor) -> torch.Tensor:
    """Model space ``(B, C, L, L)`` -> uint8 images (inverse of :func:`preprocess`, then floor)."""
    p = torch.sigmoid(y.float())
    x = (p - ALPHA) / (1 - 2 * ALPHA) * 256.0
    return x.floor().clamp(0, 255).to(torch.uint8)


def bits_per_dim(log_prob_model_space: torch.Tensor, logdet_preprocess: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Bits per dimension of 8-bit data from model-space log-density (nats) and preprocessing log-det."""
    return -(log_prob_model_space + logdet_preprocess) / (num_dims * math.log(2.0))

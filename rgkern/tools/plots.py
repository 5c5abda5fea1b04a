"""Pictures for training runs: image grids (Pillow) and bits/dim curves (matplotlib).

Nothing here touches a model. Matplotlib is used through its object-oriented API with the
Agg canvas (no ``pyplot``), so importing or calling these functions never changes the
caller's matplotlib backend and works on machines without a display. Every picture is
written atomically (:func:`rgkern.tools.files.atomic_write`): a full disk or a kill leaves
the previous file as it was. A grid is at most :data:`MAX_GRID_PIXELS` pixels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError, InputTypeError
from .files import atomic_write

__all__ = ["image_grid", "save_image_grid", "plot_history", "check_grid_size", "MAX_GRID_PIXELS"]

#: The largest picture :func:`save_image_grid` writes: 2**26 pixels (8192 x 8192), below
#: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 million), so
#: every grid written can be opened again without a warning.
MAX_GRID_PIXELS = 2**26


def check_grid_size(n: int, channels: int, height: int, width: int, nrow=None, scale: int = 1, padding: int = 1):
    """``(rows, columns)`` in pixels of the grid :func:`save_image_grid` would write, or ValueError.

    Raises ``ValueError`` naming ``scale`` and the largest scale that fits when the picture
    would exceed :data:`MAX_GRID_PIXELS`; nothing is allocated.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
        raise InputError(f"scale must be a positive int, got {scale!r}")
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow <= 0):
        raise InputError(f"nrow must be a positive int, got {nrow!r}")
    ncol = min(math.ceil(math.sqrt(n)) if nrow is None else nrow, n)
    rows = math.ceil(n / ncol)
    height_px = rows * (height + padding) + padding
    width_px = ncol * (width + padding) + padding
    if height_px * width_px * scale * scale > MAX_GRID_PIXELS:
        largest = math.isqrt(MAX_GRID_PIXELS // (height_px * width_px))
        raise InputError(
            f"a grid of {n} images of {height}x{width} at scale {scale} would be {width_px * scale} x {height_px * scale} "
            f"pixels, more than the limit of {MAX_GRID_PIXELS:,} (8192 x 8192); "
            + (f"use scale {largest} or less" if largest >= 1 else "use fewer images")
        )
    return height_px * scale, width_px * scale


def _as_uint8_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise InputTypeError(f"images must be uint8 (values 0..255), got dtype {images.dtype}")
        images = images.detach().cpu().numpy()
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise InputTypeError(f"images must be uint8 (values 0..255), got dtype {images.dtype}")
    else:
        raise InputTypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise InputError(
            f"images must have shape (N, C, H, W) with N >= 1 and C = 1 or 3, got shape {tuple(images.shape)}"
        )
    return images


def image_grid(images, nrow: int | None = None, padding: int = 1, pad_value: int = 128) -> np.ndarray:
    """Tile uint8 images ``(N, C, H, W)`` into one uint8 array ``(C, rows*(H+p)+p, nrow*(W+p)+p)``.

    ``nrow`` images per row (default ``ceil(sqrt(N))``), ``padding`` pixels of ``pad_value``
    between and around the images. Unused cells of the last row stay ``pad_value``.
    """
    images = _as_uint8_array(images)
    n, channels, height, width = images.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow <= 0:
        raise InputError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise InputError(f"padding must be a non-negative int, got {padding!r}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full(
        (channels, rows * (height + padding) + padding, ncol * (width + padding) + padding),
        pad_value,
        dtype=np.uint8,
    )
    for index in range(n):
        r, c = divmod(index, ncol)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def save_image_grid(images, path, nrow: int | None = None, scale: int = 1, padding: int = 1, pad_value: int = 128) -> Path:
    """Write uint8 images ``(N, C, H, W)`` (C = 1 or 3) as one PNG grid; returns the path.

    ``scale`` enlarges every pixel to ``scale x scale`` (nearest neighbour) so small images
    stay readable. See :func:`image_grid` for ``nrow``, ``padding`` and ``pad_value``.
    """
    from PIL import Image

    shape = _as_uint8_array(images).shape
    check_grid_size(shape[0], shape[1], shape[2], shape[3], nrow=nrow, scale=scale, padding=padding)
    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    picture = Image.fromarray(grid[0]) if grid.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(grid.transpose(1, 2, 0)))
    path = Path(path)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


def plot_history(history, path, title: str | None = None) -> Path:
    """Plot training and held-out bits/dim against the step and save it (PNG); returns the path.

    ``history`` is a list of dicts with ``step``, ``train_bpd`` and ``test_bpd`` (either
    bits/dim may be ``None``, e.g. the held-out value before the first step has no training
    value), as written by :class:`rgkern.tools.train.Trainer`.
    """
    from matplotlib.figure import Figure

    if not isinstance(history, (list, tuple)) or not all(isinstance(e, dict) and "step" in e for e in history):
        raise InputError("history must be a list of dicts with 'step', 'train_bpd' and 'test_bpd'")
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    for key, label, style in (("train_bpd", "training (mean since previous point)", "-"), ("test_bpd", "held-out", "o-")):
        points = [(e["step"], e[key]) for e in history if e.get(key) is not None]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, style, label=label, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("bits / dim")
    axes.grid(True, alpha=0.3)
    if history:
        axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path

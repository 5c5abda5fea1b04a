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
from typing import Sequence

import numpy as np
import torch

from ..core.errors import InputError, InputTypeError
from .files import atomic_write

__all__ = ["as_uint8_images", "image_grid", "save_image_grid", "save_image_groups", "save_gif", "plot_history", "check_grid_size", "MAX_GRID_PIXELS", "GROUP_LABEL_HEIGHT"]

#: The largest picture :func:`save_image_grid` writes: 2**26 pixels (8192 x 8192), below
#: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 million), so
#: every grid written can be opened again without a warning.
MAX_GRID_PIXELS = 2**26


def check_grid_size(n: int, channels: int, height: int, width: int, nrow: int | None = None, scale: int = 1,
                    padding: int = 1) -> tuple[int, int]:
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


def as_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``images`` (uint8 tensor or array ``(N, C, H, W)``, N >= 1, C = 1 or 3) as a numpy array, or a clear error."""
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


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 1, pad_value: int = 128) -> np.ndarray:
    """Tile uint8 images ``(N, C, H, W)`` into one uint8 array ``(C, rows*(H+p)+p, nrow*(W+p)+p)``.

    ``nrow`` images per row (default ``ceil(sqrt(N))``), ``padding`` pixels of ``pad_value``
    between and around the images. Unused cells of the last row stay ``pad_value``.
    """
    images = as_uint8_images(images)
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


def save_image_grid(images: torch.Tensor | np.ndarray, path: Path | str, nrow: int | None = None, scale: int = 1,
                    padding: int = 1, pad_value: int = 128) -> Path:
    """Write uint8 images ``(N, C, H, W)`` (C = 1 or 3) as one PNG grid; returns the path.

    ``scale`` enlarges every pixel to ``scale x scale`` (nearest neighbour) so small images
    stay readable. See :func:`image_grid` for ``nrow``, ``padding`` and ``pad_value``.
    """
    from PIL import Image

    shape = as_uint8_images(images).shape
    check_grid_size(shape[0], shape[1], shape[2], shape[3], nrow=nrow, scale=scale, padding=padding)
    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    picture = Image.fromarray(grid[0]) if grid.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(grid.transpose(1, 2, 0)))
    path = Path(path)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


#: Height in pixels of the label strip above each group of :func:`save_image_groups`.
GROUP_LABEL_HEIGHT = 18


def _label_strip(text: str, width: int, channels: int) -> np.ndarray:
    """uint8 ``(channels, GROUP_LABEL_HEIGHT, width)``: ``text`` in white on dark grey, Pillow's default font."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("L", (width, GROUP_LABEL_HEIGHT), 40)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # a Pillow older than 10.1: the bitmap font, which has one size
        font = ImageFont.load_default()
    ImageDraw.Draw(strip).text((4, 2), text, fill=255, font=font)
    return np.repeat(np.asarray(strip)[None], channels, axis=0)


def save_image_groups(groups: Sequence[torch.Tensor | np.ndarray], labels: Sequence[str], path: Path | str,
                      nrow: int | None = None, scale: int = 1, padding: int = 1, pad_value: int = 128) -> Path:
    """Write groups of uint8 images, each under a text label, as one PNG, the groups top to bottom; returns the path.

    ``groups``: a sequence of uint8 ``(N_i, C, H, W)`` (C = 1 or 3, the same C, H, W in
    all); ``labels``: one str per group. Each group is the grid :func:`save_image_grid`
    writes (``nrow``, ``scale``, ``padding``, ``pad_value``) under a strip of
    :data:`GROUP_LABEL_HEIGHT` pixels holding its label; a group narrower than the widest
    is filled out on the right with ``pad_value``. So the picture is as wide as the widest
    grid and as high as the grids plus one strip per group. Written atomically.
    """
    from PIL import Image

    if not isinstance(groups, (list, tuple)) or not groups:
        raise InputError("groups must be a non-empty list of uint8 image batches (N, C, H, W)")
    if not isinstance(labels, (list, tuple)) or len(labels) != len(groups) or not all(isinstance(t, str) for t in labels):
        raise InputError(f"labels must be one str per group ({len(groups)}), got {labels!r}")
    shapes = {tuple(as_uint8_images(images).shape[1:]) for images in groups}
    if len(shapes) != 1:
        raise InputError(f"every group must hold images of one shape (C, H, W), got {sorted(shapes)}")
    grids = []
    for images in groups:
        shape = as_uint8_images(images).shape
        check_grid_size(shape[0], shape[1], shape[2], shape[3], nrow=nrow, scale=scale, padding=padding)
        grid = image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
        grids.append(grid.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else grid)
    width = max(grid.shape[2] for grid in grids)
    height = sum(grid.shape[1] + GROUP_LABEL_HEIGHT for grid in grids)
    if width * height > MAX_GRID_PIXELS:
        raise InputError(f"the picture would be {width} x {height} pixels, more than the limit of {MAX_GRID_PIXELS:,}; use a smaller scale or fewer images")
    channels = grids[0].shape[0]
    rows = []
    for grid, text in zip(grids, labels):
        rows.append(_label_strip(text, width, channels))
        filled = np.full((channels, grid.shape[1], width), pad_value, dtype=np.uint8)
        filled[:, :, : grid.shape[2]] = grid
        rows.append(filled)
    picture = np.concatenate(rows, axis=1)
    image = Image.fromarray(picture[0]) if channels == 1 else Image.fromarray(np.ascontiguousarray(picture.transpose(1, 2, 0)))
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def save_gif(frames: Sequence[torch.Tensor | np.ndarray], path: Path | str, labels: Sequence[str] | None = None,
             nrow: int | None = None, scale: int = 1, padding: int = 1, pad_value: int = 128, duration: int = 500) -> Path:
    """Write an animated GIF, one frame per uint8 batch ``(N, C, H, W)`` of ``frames``, looping forever; returns the path.

    Each frame is the grid :func:`save_image_grid` writes of its batch (``nrow``, ``scale``,
    ``padding``, ``pad_value``; every batch of one shape), under a label strip of
    :data:`GROUP_LABEL_HEIGHT` pixels when ``labels`` (one str per frame) is given.
    ``duration``: milliseconds per frame. Written atomically. Pillow merges a frame that
    equals the one before it into that one (adding its duration, so the animation looks the
    same); with ``labels`` that differ, every frame is kept.
    """
    from PIL import Image

    if not isinstance(frames, (list, tuple)) or not frames:
        raise InputError("frames must be a non-empty list of uint8 image batches (N, C, H, W)")
    if labels is not None and (not isinstance(labels, (list, tuple)) or len(labels) != len(frames) or not all(isinstance(t, str) for t in labels)):
        raise InputError(f"labels must be None or one str per frame ({len(frames)}), got {labels!r}")
    if isinstance(duration, bool) or not isinstance(duration, int) or duration <= 0:
        raise InputError(f"duration must be a positive int (milliseconds per frame), got {duration!r}")
    shapes = {tuple(as_uint8_images(batch).shape) for batch in frames}
    if len(shapes) != 1:
        raise InputError(f"every frame must hold images of one shape (N, C, H, W), got {sorted(shapes)}")
    (n, channels, height, width), = shapes
    check_grid_size(n, channels, height, width, nrow=nrow, scale=scale, padding=padding)
    pictures = []
    for index, batch in enumerate(frames):
        grid = image_grid(batch, nrow=nrow, padding=padding, pad_value=pad_value)
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else grid
        if labels is not None:
            grid = np.concatenate([_label_strip(labels[index], grid.shape[2], channels), grid], axis=1)
        pictures.append(Image.fromarray(grid[0]) if channels == 1 else Image.fromarray(np.ascontiguousarray(grid.transpose(1, 2, 0))))
    first, rest = pictures[0], pictures[1:]
    path = Path(path)
    atomic_write(path, lambda tmp: first.save(
        tmp, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0, optimize=False, disposal=1,
    ))
    return path


def plot_history(history: Sequence[dict], path: Path | str, title: str | None = None, reference: dict | None = None) -> Path:
    """Plot training and held-out bits/dim against the step and save it (PNG); returns the path.

    ``history`` is a list of dicts with ``step``, ``train_bpd`` and ``test_bpd`` (either
    bits/dim may be ``None``, e.g. the held-out value before the first step has no training
    value), as written by :class:`rgkern.tools.trainer.Trainer`. The picture is 600 x 400
    pixels; when entries hold an MSDS quality score (``"quality"``: ``{temperature label:
    score}``, see :mod:`rgkern.tools.quality`) a second panel beside it, 1200 x 400 in all,
    shows the samples' oval-sized blobs (%), blobs per image and colour spread (and the
    orientation spread for MSDS2) against the step, one line style per temperature, with
    ``reference`` (the data's score) as dotted lines.
    """
    from matplotlib.figure import Figure

    if not isinstance(history, (list, tuple)) or not all(isinstance(e, dict) and "step" in e for e in history):
        raise InputError("history must be a list of dicts with 'step', 'train_bpd' and 'test_bpd'")
    with_quality = any(e.get("quality") for e in history)
    figure = Figure(figsize=(12 if with_quality else 6, 4), dpi=100)
    panels = figure.subplots(1, 2 if with_quality else 1, squeeze=False)[0]
    axes = panels[0]
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
    if with_quality:
        _plot_quality(panels[1], history, reference)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


# (key, label, colour, factor): oval_fraction is drawn in percent.
_QUALITY_LINES = (
    ("oval_fraction", "oval-sized blobs (%)", "tab:green", 100.0),
    ("blobs_per_image", "blobs per image", "tab:purple", 1.0),
    ("colour_spread", "colour spread (0-255)", "tab:red", 1.0),
    ("orientation_spread", "orientation spread (degrees)", "tab:orange", 1.0),
    ("specks_per_image", "lone bright pixels per image", "tab:gray", 1.0),
)
_TEMPERATURE_STYLES = ("o-", "s--", "^:", "v-.", "D-", "x--", "+:", "*-.")


def _plot_quality(axes, history, reference) -> None:
    labels = []
    for entry in history:
        for label in entry.get("quality") or {}:
            if label not in labels:
                labels.append(label)
    for key, name, colour, factor in _QUALITY_LINES:
        for number, label in enumerate(labels):
            points = [
                (e["step"], factor * e["quality"][label][key])
                for e in history
                if (e.get("quality") or {}).get(label, {}).get(key) is not None
            ]
            if points:
                steps, values = zip(*points)
                style = _TEMPERATURE_STYLES[number % len(_TEMPERATURE_STYLES)]
                axes.plot(steps, values, style, color=colour, markersize=3, label=f"{name}, T={label}")
        if reference and reference.get(key) is not None:
            axes.axhline(factor * reference[key], color=colour, linestyle=":", linewidth=1, label=f"{name}, data")
    axes.set_xlabel("step")
    axes.set_ylabel("value")
    axes.set_title("samples (MSDS quality score; dotted: the data)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=6, ncol=2)

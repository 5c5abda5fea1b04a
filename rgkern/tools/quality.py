"""A quality score for MSDS1 / MSDS2 images: do they consist of ovals, and do the ovals share the global factor?

Bits/dim says how well a model fits, not whether its samples show the data's structure. An
MSDS image (:mod:`rgkern.data.msds`) is a black background with 16 ovals on a 4x4 grid; in
MSDS1 the ovals of an image share one colour (each channel within +-32 of a base), in MSDS2
one orientation (within 45 degrees). :func:`msds_quality` measures both on any uint8 images,
data or samples, from their connected bright blobs:

* A pixel is *bright* when its brightest channel is at least :data:`BRIGHT_THRESHOLD` (40 of
  255). Bright pixels form 4-connected components (neighbours share an edge).
  4-connectivity is what measures the generator's ovals: each oval is a filled, rotated
  ellipse (about 7 x 3 pixels, anti-aliased), whose bright pixels are 4-connected, while two
  neighbouring ovals shifted towards each other often meet only at a corner; 8-connectivity
  would merge those pairs (the data would score 84.5% instead of 88.6%).
* A *blob* is a component of at least :data:`MIN_BLOB_SIZE` (2) pixels. A lone bright pixel
  is a *speck*, counted apart (``specks_per_image``): the data has almost none (0.001 per
  image in MSDS1, 0.04 in MSDS2, from dark ovals), while an under-trained model strews a
  dozen or more per image, which would otherwise swamp the other figures.
* An *oval-sized* blob has :data:`OVAL_SIZE` (8 to 24) pixels: in MSDS1 and MSDS2 88% of the
  blobs do (the rest are mostly two ovals that touch, 33 to 46 pixels).
* ``oval_fraction``: the fraction of all blobs (pooled over the images) that are
  oval-sized. ``blobs_per_image``: the mean number of blobs per image (the data: 14.3, of
  16 ovals, since touching ovals count once).
* ``colour_spread``: for each image with at least two oval-sized blobs, the root mean square
  Euclidean distance of those blobs' mean RGB colours (0..255 scale, the mean over each
  blob's pixels) from their average colour, ``sqrt(mean_k |c_k - mean(c)|^2)``; averaged
  over those images. It is the spread of colour *within* an image: small for MSDS1, whose
  ovals share a colour.
* ``orientation_spread`` (``kind=2`` only): for each image with at least two oval-sized
  blobs, the angular deviation of the blobs' orientations in degrees. A blob's orientation
  is ``theta = atan2(2 mu11, mu20 - mu02) / 2`` from the central second moments of its
  pixel coordinates; orientations are axial (theta and theta + 180 degrees are the same),
  so with ``R = |mean_k exp(2i theta_k)|`` the spread is ``sqrt(2 (1 - R)) / 2`` radians,
  in degrees: about the standard deviation of the angles when they are close (0 when all
  agree, at most 40.5 degrees). It is small for MSDS2, whose ovals share an orientation.

Measured with these definitions on the first 1,000 images of each split (seed 0): MSDS1
test 88.6% oval-sized blobs, 14.3 blobs per image, colour spread 28.7 (orientation spread
34.9), train 88.3%, 14.2, 28.6 (34.9); MSDS2 test 88.6%, 14.3, colour spread 100.2,
orientation spread 12.6, train 88.5%, 14.3, 100.6, 12.4. Images of uniform noise have no
oval-sized blobs (one bright blob covers almost the whole image). 256 samples of the demo's
checkpoint (``cpu`` preset, 2,000 steps, 3.219 held-out bits/dim; latent seed 0): at temperature 1 40.8%
oval-sized blobs, 22.7 blobs per image, colour spread 70.7, 16.6 specks per image; at 0.7
29.9%, 18.4, 51.6, 22.3.

:func:`traversal_cells` measures a latent traversal (:func:`rgkern.tools.explain.traverse`) per
oval cell: how many of the 16 cells' ovals change colour over it, and how many change together
(the paper's MSDS1 figure: one top-level latent recolours every oval of the image at once).

Everything is numpy (no scipy): the blobs are found by a vectorised union-find over the
whole batch, about 30 ms for 256 images on one core.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.errors import InputError
from .plots import as_uint8_images

__all__ = [
    "msds_quality",
    "label_blobs",
    "format_quality",
    "traversal_cells",
    "BRIGHT_THRESHOLD",
    "MIN_BLOB_SIZE",
    "OVAL_SIZE",
    "QUALITY_KEYS",
    "CELL_CHANGE_THRESHOLD",
    "TOGETHER_COSINE",
]

#: A pixel is bright when its brightest channel is at least this (0..255).
BRIGHT_THRESHOLD = 40
#: Components of bright pixels smaller than this are specks, not blobs.
MIN_BLOB_SIZE = 2
#: Sizes in pixels (inclusive) of a blob that has the size of one MSDS oval.
OVAL_SIZE = (8, 24)
#: The keys of :func:`msds_quality`'s result, per kind, in the order they are printed.
QUALITY_KEYS = {
    1: ("oval_fraction", "blobs_per_image", "colour_spread"),
    2: ("oval_fraction", "blobs_per_image", "colour_spread", "orientation_spread"),
}


def _check_images(images) -> np.ndarray:
    images = as_uint8_images(images)
    if images.ndim != 4 or images.shape[0] == 0 or tuple(images.shape[1:]) != (3, 32, 32):
        raise InputError(f"images must have shape (N, 3, 32, 32) with N >= 1 (MSDS images), got {tuple(images.shape)}")
    return images


def label_blobs(bright: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a bool array ``(N, H, W)`` (each image on its own).

    Returns int64 ``(N, H, W)``: -1 for pixels that are not bright, otherwise the flat index
    (into the whole batch) of the smallest pixel of the pixel's component, so two bright
    pixels share a label exactly when a path of bright pixels through shared edges joins
    them inside one image.

    Union-find, vectorised: every bright pixel starts as its own root; each round hooks, for
    every edge between two bright pixels of different components, the larger root onto the
    smaller one, then compresses all paths to their roots. Parents always have smaller
    indices than their children, so no cycle can form; the rounds stop when every edge
    joins pixels of one component.
    """
    n, height, width = bright.shape
    flat = bright.reshape(-1)
    index = np.arange(flat.size, dtype=np.int64).reshape(n, height, width)
    # Edges between bright neighbours: right (same row) and down (same image).
    right = bright[:, :, :-1] & bright[:, :, 1:]
    down = bright[:, :-1, :] & bright[:, 1:, :]
    a = np.concatenate([index[:, :, :-1][right], index[:, :-1, :][down]])
    b = np.concatenate([index[:, :, 1:][right], index[:, 1:, :][down]])
    parent = np.arange(flat.size, dtype=np.int64)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            break
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # path compression: every pixel points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    labels = np.where(flat, parent, -1)
    return labels.reshape(n, height, width)


def msds_quality(images: torch.Tensor | np.ndarray, kind: int = 1) -> dict:
    """The MSDS quality score of uint8 images ``(N, 3, 32, 32)`` (a torch tensor or numpy array).

    ``kind``: 1 (MSDS1: colour is the global factor) or 2 (MSDS2: orientation is); kind 2
    adds ``orientation_spread``. The module docstring defines every figure. Returns a dict
    of plain Python numbers:

    * ``images``: N; ``blobs``: the number of blobs in all; ``specks_per_image``: lone
      bright pixels per image;
    * ``oval_fraction`` (0..1), ``blobs_per_image``, ``colour_spread`` (0..255 scale) and,
      for ``kind=2``, ``orientation_spread`` (degrees).

    ``oval_fraction`` is None when there is no blob at all; the spreads are None when no
    image holds two oval-sized blobs. Raises :class:`~rgkern.core.errors.InputTypeError`
    for another dtype or type, :class:`~rgkern.core.errors.InputError` for another shape
    or kind.
    """
    if isinstance(kind, bool) or kind not in (1, 2):
        raise InputError(f"kind must be 1 (MSDS1) or 2 (MSDS2), got {kind!r}")
    images = _check_images(images)
    n, _, height, width = images.shape
    labels = label_blobs(images.max(axis=1) >= BRIGHT_THRESHOLD).reshape(-1)
    lit = labels >= 0
    roots, component, size = np.unique(labels[lit], return_inverse=True, return_counts=True)
    keep = size >= MIN_BLOB_SIZE  # the rest are specks
    # From here on only the blobs: ``bright`` marks their pixels, ``blob`` numbers them 0 .. count - 1.
    bright = lit.copy()
    bright[lit] = keep[component]
    blob = (np.cumsum(keep) - 1)[component[keep[component]]]
    roots, size = roots[keep], size[keep]
    count = roots.size
    result = {"images": int(n), "blobs": int(count), "blobs_per_image": count / n, "specks_per_image": int((~keep).sum()) / n}
    oval = (size >= OVAL_SIZE[0]) & (size <= OVAL_SIZE[1])
    result["oval_fraction"] = float(oval.mean()) if count else None
    image_of_blob = roots // (height * width)
    # Mean colour of each blob, then the spread among an image's oval-sized blobs.
    pixels = images.transpose(0, 2, 3, 1).reshape(-1, 3)[bright].astype(np.float64)
    colour = np.stack([np.bincount(blob, pixels[:, c], minlength=count) for c in range(3)], axis=1) / size[:, None]
    kept = image_of_blob[oval]
    per_image = np.bincount(kept, minlength=n)
    counted = per_image >= 2
    result["colour_spread"] = _spread(colour[oval], kept, per_image, counted, _rms_distance)
    if kind == 2:
        position = np.flatnonzero(bright) % (height * width)
        y, x = (position // width).astype(np.float64), (position % width).astype(np.float64)
        moments = [np.bincount(blob, w, minlength=count) / size for w in (x, y, x * x, y * y, x * y)]
        mean_x, mean_y, xx, yy, xy = moments
        mu20, mu02, mu11 = xx - mean_x**2, yy - mean_y**2, xy - mean_x * mean_y
        doubled = np.arctan2(2 * mu11, mu20 - mu02)  # twice the orientation
        unit = np.stack([np.cos(doubled), np.sin(doubled)], axis=1)
        result["orientation_spread"] = _spread(unit[oval], kept, per_image, counted, _angular_deviation)
    return result


def _spread(values: np.ndarray, image: np.ndarray, per_image: np.ndarray, counted: np.ndarray, measure):
    """Mean over the ``counted`` images of ``measure(per-image mean, per-blob values)``; None if none is counted."""
    if not counted.any():
        return None
    sums = np.stack([np.bincount(image, values[:, c], minlength=per_image.size) for c in range(values.shape[1])], axis=1)
    mean = sums / np.maximum(per_image, 1)[:, None]
    return float(np.mean(measure(values, mean, image, per_image)[counted]))


def _rms_distance(colour, mean, image, per_image):
    squared = ((colour - mean[image]) ** 2).sum(axis=1)
    return np.sqrt(np.bincount(image, squared, minlength=per_image.size) / np.maximum(per_image, 1))


def _angular_deviation(unit, mean, image, per_image):
    resultant = np.minimum(np.hypot(mean[:, 0], mean[:, 1]), 1.0)  # R = |mean of exp(2i theta)|
    return np.degrees(np.sqrt(2 * (1 - resultant)) / 2)


def format_quality(score: dict) -> str:
    """One line for a :func:`msds_quality` result, e.g. ``88.6% oval-sized blobs, 14.3 blobs per image, colour spread 28.7, 0.0 specks per image``."""
    def number(key, text):
        value = score.get(key)
        return "n/a" if value is None else text.format(value)

    parts = [
        number("oval_fraction", "{:.1%}") + " oval-sized blobs",
        number("blobs_per_image", "{:.1f}") + " blobs per image",
        "colour spread " + number("colour_spread", "{:.1f}"),
    ]
    if "orientation_spread" in score:
        parts.append("orientation spread " + number("orientation_spread", "{:.1f}") + " degrees")
    if "specks_per_image" in score:
        parts.append(number("specks_per_image", "{:.1f}") + " specks per image")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- traversals, per oval cell
#: A cell's oval *changed colour* over a traversal when its mean colour moves by at least this
#: much (Euclidean RGB distance on the 0..255 scale, between the two frames furthest apart).
#: MSDS1 draws each oval's channels within +-32 of the image's base colour; 30 is a change the
#: eye sees at once on the 4x magnified pictures.
CELL_CHANGE_THRESHOLD = 30.0
#: A changed cell changes *together* with the others when the cosine similarity of its colour
#: path with the mean path of all changed cells is at least this.
TOGETHER_COSINE = 0.5
_CELLS, _CELL_SIZE = 4, 8


def traversal_cells(frames: torch.Tensor | np.ndarray, change_threshold: float = CELL_CHANGE_THRESHOLD,
                    together_cosine: float = TOGETHER_COSINE) -> dict:
    """How many of the 16 MSDS oval cells a traversal recolours, and how many recolour together.

    ``frames``: uint8 images ``(B, V, 3, 32, 32)`` (torch or numpy): for each of B images the
    V frames of one traversal (:func:`rgkern.tools.explain.traverse`, through
    :func:`rgkern.postprocess`). An MSDS image is a 4x4 grid of 8x8 cells with one oval each
    (:mod:`rgkern.data.msds`); cell ``k`` is grid row ``k // 4``, column ``k % 4``.

    For every image, frame and cell, the oval's colour is the mean RGB colour of the cell's
    bright pixels (brightest channel at least :data:`BRIGHT_THRESHOLD`). A cell is *found*
    when it has a bright pixel in every frame. Its colour path is its colour at each frame
    less its mean over the frames, ``(V, 3)``; its *change* is the largest distance between
    the colours of two frames. A found cell *changed* when its change is at least
    ``change_threshold``; a changed cell changed *together* when the cosine similarity of its
    flattened path with the mean path of the image's changed cells is at least
    ``together_cosine`` (its colour moves the same way at the same time: all ovals turning
    from red to blue count, half of them turning the other way do not).

    Returns a dict: ``change`` float64 ``(B, 16)`` (NaN for cells not found), ``found``,
    ``changed``, ``together`` bool ``(B, 16)``, and per image int64 ``(B,)``:
    ``cells_found``, ``cells_changed``, ``cells_together``.
    """
    shape = tuple(getattr(frames, "shape", ()))
    if len(shape) != 5 or shape[0] == 0 or shape[1] < 2 or shape[2:] != (3, 32, 32):
        if not isinstance(frames, (torch.Tensor, np.ndarray)):
            as_uint8_images(frames)  # the type error
        raise InputError(
            f"frames must have shape (B, V, 3, 32, 32) with B >= 1 and V >= 2 (the frames of a traversal of MSDS images), "
            f"got {shape}"
        )
    images = as_uint8_images(frames.reshape(-1, *shape[2:])).reshape(shape)
    for name, value in (("change_threshold", change_threshold), ("together_cosine", together_cosine)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if not -1 <= together_cosine <= 1:
        raise InputError(f"together_cosine must lie in [-1, 1], got {together_cosine!r}")
    B, V = images.shape[:2]
    # (B, V, 3, 4, 8, 4, 8) -> (B, V, 16 cells, 64 pixels, 3)
    cells = images.reshape(B, V, 3, _CELLS, _CELL_SIZE, _CELLS, _CELL_SIZE).transpose(0, 1, 3, 5, 4, 6, 2)
    cells = cells.reshape(B, V, _CELLS * _CELLS, _CELL_SIZE * _CELL_SIZE, 3).astype(np.float64)
    bright = cells.max(axis=4) >= BRIGHT_THRESHOLD                      # (B, V, 16, 64)
    count = bright.sum(axis=3)                                          # (B, V, 16)
    found = (count > 0).all(axis=1)                                     # (B, 16)
    colour = (cells * bright[..., None]).sum(axis=3) / np.maximum(count, 1)[..., None]  # (B, V, 16, 3)
    pairwise = np.linalg.norm(colour[:, :, None] - colour[:, None], axis=4)            # (B, V, V, 16)
    change = np.where(found, pairwise.max(axis=(1, 2)), np.nan)
    changed = found & (np.nan_to_num(change, nan=0.0) >= change_threshold)
    path = (colour - colour.mean(axis=1, keepdims=True)).transpose(0, 2, 1, 3).reshape(B, _CELLS * _CELLS, V * 3)
    weights = changed[..., None].astype(np.float64)
    mean_path = (path * weights).sum(axis=1, keepdims=True) / np.maximum(weights.sum(axis=1, keepdims=True), 1)
    norms = np.linalg.norm(path, axis=2) * np.linalg.norm(mean_path, axis=2)
    cosine = (path * mean_path).sum(axis=2) / np.where(norms > 0, norms, 1.0)
    together = changed & (cosine >= together_cosine)
    return {
        "change": change,
        "found": found,
        "changed": changed,
        "together": together,
        "cells_found": found.sum(axis=1),
        "cells_changed": changed.sum(axis=1),
        "cells_together": together.sum(axis=1),
    }

"""The synthetic MSDS1 / MSDS2 datasets (paper sec. 4.1 and appendix B; docs/design.md section 7).

RGB 32x32 images on a black background, each a 4x4 grid of 8x8 cells with one
oval per cell, generated with the parameters of the paper authors' own
generator: the oval is a filled ellipse with bounding box (1, 3)-(7, 5) drawn
on a transparent 8x8 RGBA tile, rotated counter-clockwise about the tile
centre by its angle (degrees, bicubic resampling, which anti-aliases the
edges), and pasted at ``(8*c + dx, 8*r + dy)`` with its alpha as the mask
(``dx, dy`` uniform integers in [-1, 1]).

* MSDS1 -- colour is global, orientation local: one base colour per image
  (channels uniform integers in [32, 223]); each oval's channel is the base
  plus a uniform integer in [-32, 32]; each oval's angle uniform in [0, 180).
* MSDS2 -- orientation is global, colour local: one base angle per image,
  uniform in [0, 180); each oval's angle is the base plus a uniform value in
  [0, 45); each oval's colour channels are uniform integers in [0, 255].

Generation is deterministic: image ``i`` of a split is drawn from its own
``numpy.random.default_rng(SeedSequence([seed, kind, split_id, i]))``
(``split_id`` 0 for "train", 1 for "test"), so any prefix or subset of a split
is identical however many images are generated.  Full splits hold 90,000 train
and 10,000 test images.

Oval order: oval ``k`` (0..15) sits in grid row ``r = k // 4`` and grid column
``c = k % 4`` (row-major, like the image itself).  Labels (numpy arrays):

* ``"position"`` int16 ``(N, 16, 2)``: ``(x, y)`` = (column, row) pixel
  coordinates of the top-left corner of the oval's 8x8 tile in the image,
  i.e. ``(8*c + dx, 8*r + dy)``, each in [-1, 25].
* ``"angle"`` float64 ``(N, 16)``: rotation in degrees, counter-clockwise as
  displayed (image y axis pointing down).  The oval is symmetric, so only the
  angle modulo 180 is visible; MSDS2 angles may exceed 180 (base + offset).
* ``"colour"`` uint8 ``(N, 16, 3)``: the oval's RGB fill colour.
* ``"base_colour"`` uint8 ``(N, 3)`` (MSDS1 only) / ``"base_angle"`` float64
  ``(N,)`` (MSDS2 only): the per-image global factor.

Exactly reproducing the anti-aliased edge pixels relies on Pillow's bicubic
rotation, so the pixels may differ in the last bit between Pillow versions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..core.errors import InputError, file_error
from .base import ImageDataset, check_size, check_split, is_int

__all__ = ["MSDS_SPLIT_SIZES", "MSDS_IMAGE_SIZE", "generate_msds", "MSDS"]

MSDS_SPLIT_SIZES: Dict[str, int] = {"train": 90_000, "test": 10_000}
MSDS_IMAGE_SIZE = 32
_MSDS_SPLIT_IDS = {"train": 0, "test": 1}
_GRID = 4
_CELL = 8
_N_OVALS = _GRID * _GRID
_ELLIPSE_BOX = (1, 3, 7, 5)
# Authors' tile background: transparent white (only alpha matters after
# Pillow's premultiplied-alpha rotation, but keep it identical).
_TILE_BACKGROUND = (255, 255, 255, 0)
_BICUBIC = Image.Resampling.BICUBIC


def _check_kind(kind) -> int:
    if not is_int(kind) or int(kind) not in (1, 2):
        raise InputError(f"kind must be 1 (MSDS1) or 2 (MSDS2), got {kind!r}")
    return int(kind)


def _check_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _msds_indices(indices_or_count, split: str) -> np.ndarray:
    total = MSDS_SPLIT_SIZES[split]
    if is_int(indices_or_count):
        count = int(indices_or_count)
        if count < 0 or count > total:
            raise InputError(
                f"image count must be an int in [0, {total}] for the {split!r} split, "
                f"got {indices_or_count!r}")
        return np.arange(count, dtype=np.int64)
    try:
        idx = np.asarray(indices_or_count)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(
            f"indices_or_count must be an int or a 1-D sequence of ints, got "
            f"{indices_or_count!r}") from exc
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise InputError(
            "indices_or_count must be an int or a 1-D sequence of ints, got an array "
            f"of shape {idx.shape} and dtype {idx.dtype}")
    bad = (idx < 0) | (idx >= total)
    if bad.any():
        raise InputError(
            f"image indices must lie in [0, {total}) for the {split!r} split, got "
            f"{int(idx[bad][0])}")
    return idx.astype(np.int64)


def _draw_msds_image(colours: List[List[int]], angles: List[float],
                     positions: List[List[int]]) -> np.ndarray:
    """Render one image; lists are indexed by oval k (row-major). -> (32, 32, 3) uint8."""
    img = Image.new("RGB", (MSDS_IMAGE_SIZE, MSDS_IMAGE_SIZE), (0, 0, 0))
    # Paste in the authors' order (grid column outer, grid row inner): the
    # anti-aliased fringes of neighbouring tiles can overlap by a pixel.
    for c in range(_GRID):
        for r in range(_GRID):
            k = r * _GRID + c
            tile = Image.new("RGBA", (_CELL, _CELL), _TILE_BACKGROUND)
            red, green, blue = colours[k]
            ImageDraw.Draw(tile).ellipse(_ELLIPSE_BOX, (red, green, blue, 255))
            tile = tile.rotate(angles[k], resample=_BICUBIC)
            img.paste(tile, (positions[k][0], positions[k][1]), mask=tile)
    return np.asarray(img)


def _sample_msds_params(kind: int, rng: np.random.Generator):
    """Draw one image's factors in a fixed order (part of the reproducibility contract)."""
    if kind == 1:
        base = rng.integers(32, 224, size=3)                       # [32, 223]
        colours = base + rng.integers(-32, 33, size=(_N_OVALS, 3))  # base + [-32, 32]
        angles = rng.random(_N_OVALS) * 180.0                      # [0, 180)
        base_out = base
    else:
        base = rng.random() * 180.0                                # [0, 180)
        angles = base + rng.random(_N_OVALS) * 45.0                # base + [0, 45)
        colours = rng.integers(0, 256, size=(_N_OVALS, 3))         # [0, 255]
        base_out = base
    offsets = rng.integers(-1, 2, size=(_N_OVALS, 2))              # dx, dy in [-1, 1]
    return colours, angles, offsets, base_out


# (x, y) top-left corner of each cell, oval k = 4 * row + col.
_CELL_ORIGINS = np.stack(
    [np.tile(np.arange(_GRID) * _CELL, _GRID),          # x = 8 * col
     np.repeat(np.arange(_GRID) * _CELL, _GRID)],       # y = 8 * row
    axis=1)


def generate_msds(kind: int, indices_or_count: Union[int, Sequence[int], np.ndarray], seed: int = 0,
                  split: str = "train", progress: bool = False) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Generate MSDS1 (``kind=1``) or MSDS2 (``kind=2``) images and labels.

    Parameters
    ----------
    kind: 1 or 2.
    indices_or_count: an int ``n`` (the first ``n`` images of the split, i.e.
        indices ``0..n-1``) or a 1-D sequence of image indices in
        ``[0, split size)``.  Image ``i`` is the same whichever other images
        are generated with it.
    seed: non-negative int; the whole dataset is a function of ``seed``.
    split: "train" (90,000 images) or "test" (10,000 images); the two splits
        are drawn from different random streams.
    progress: show a tqdm progress bar.

    Returns
    -------
    images: ``np.uint8`` array ``(N, 3, 32, 32)`` (channels first, RGB).
    labels: dict of numpy arrays -- ``"position"`` int16 ``(N, 16, 2)`` tile
        top-left ``(x, y)``; ``"angle"`` float64 ``(N, 16)`` degrees;
        ``"colour"`` uint8 ``(N, 16, 3)``; plus ``"base_colour"`` uint8
        ``(N, 3)`` for MSDS1 or ``"base_angle"`` float64 ``(N,)`` for MSDS2.
        Oval ``k`` is grid row ``k // 4``, column ``k % 4``.  See the module
        docstring for the exact conventions.

    Speed: about 1 ms per image on one CPU core (Pillow does the rotation).
    """
    kind = _check_kind(kind)
    split = check_split(split)
    seed = _check_seed(seed)
    indices = _msds_indices(indices_or_count, split)
    n = len(indices)
    images = np.empty((n, MSDS_IMAGE_SIZE, MSDS_IMAGE_SIZE, 3), dtype=np.uint8)
    position = np.empty((n, _N_OVALS, 2), dtype=np.int16)
    angle = np.empty((n, _N_OVALS), dtype=np.float64)
    colour = np.empty((n, _N_OVALS, 3), dtype=np.uint8)
    if kind == 1:
        base = np.empty((n, 3), dtype=np.uint8)
    else:
        base = np.empty((n,), dtype=np.float64)
    split_id = _MSDS_SPLIT_IDS[split]
    iterator = tqdm(range(n), desc=f"MSDS{kind} {split}", unit="img",
                    disable=not progress, leave=False)
    for row in iterator:
        rng = np.random.default_rng(
            np.random.SeedSequence([seed, kind, split_id, int(indices[row])]))
        cols, angs, offs, b = _sample_msds_params(kind, rng)
        pos = _CELL_ORIGINS + offs
        images[row] = _draw_msds_image(cols.tolist(), angs.tolist(), pos.tolist())
        position[row] = pos
        angle[row] = angs
        colour[row] = cols
        base[row] = b
    labels = {"position": position, "angle": angle, "colour": colour,
              ("base_colour" if kind == 1 else "base_angle"): base}
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


_MSDS_CACHE_VERSION = 1


class MSDS(ImageDataset):
    """The MSDS1 / MSDS2 dataset, generated eagerly in the constructor.

    ``MSDS(kind=1, split="train", size=None, seed=0, progress=True, cache_dir=None)``

    * ``kind``: 1 or 2; ``split``: "train" (90,000) or "test" (10,000);
      ``size``: None for the full split, or a positive int <= the split size
      (the first ``size`` images -- a prefix of the full split).
    * ``progress``: tqdm bar while generating (only for >= 1000 images).
    * ``cache_dir``: optional folder; the generated arrays are saved there as
      ``.npz`` (named by kind, split, seed, size and Pillow version) and
      reloaded on the next construction instead of regenerating.

    Attributes: ``images`` -- ``torch.uint8`` ``(N, 3, 32, 32)``; ``labels`` --
    dict of numpy arrays as returned by :func:`generate_msds`; ``kind``,
    ``split``, ``seed``.  ``ds[i]`` is ``images[i]`` (``(3, 32, 32)`` uint8).
    """

    def __init__(self, kind: int = 1, split: str = "train", size: Optional[int] = None,
                 seed: int = 0, progress: bool = True,
                 cache_dir: Optional[Union[str, os.PathLike]] = None):
        self.kind = _check_kind(kind)
        self.split = check_split(split)
        self.seed = _check_seed(seed)
        n = check_size(size, MSDS_SPLIT_SIZES[self.split],
                        f"the MSDS {self.split!r} split")
        images = labels = None
        cache_path = None
        if cache_dir is not None:
            cache_path = Path(cache_dir) / (
                f"msds{self.kind}_{self.split}_seed{self.seed}_n{n}"
                f"_pil{PIL.__version__}_v{_MSDS_CACHE_VERSION}.npz")
            if cache_path.is_file():
                images, labels = self._load_cache(cache_path, n)
        if images is None:
            images, labels = generate_msds(self.kind, n, seed=self.seed, split=self.split,
                                           progress=progress and n >= 1000)
            if cache_path is not None:
                self._save_cache(cache_path, images, labels)
        self.images = torch.from_numpy(images)
        self.labels = labels

    @staticmethod
    def _load_cache(path: Path, n: int):
        try:
            with np.load(path) as f:
                images = f["images"]
                labels = {k[len("label_"):]: f[k] for k in f.files if k.startswith("label_")}
        except Exception:
            return None, None          # unreadable cache: regenerate and overwrite
        if images.shape != (n, 3, MSDS_IMAGE_SIZE, MSDS_IMAGE_SIZE) or images.dtype != np.uint8:
            return None, None
        return images, labels

    @staticmethod
    def _save_cache(path: Path, images: np.ndarray, labels: Dict[str, np.ndarray]) -> None:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, **{f"label_{k}": v for k, v in labels.items()})
            os.replace(tmp, path)      # atomic: concurrent readers never see half a file
        except BaseException as error:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(error, OSError):  # full disk, read-only or unwritable cache folder
                raise file_error(error.errno, f"cannot write the MSDS cache {str(path)!r}: "
                                 f"{error.strerror or error}; free space there or choose "
                                 "another cache folder (--data-root)") from error
            raise

    def __repr__(self) -> str:
        return f"MSDS(kind={self.kind}, split={self.split!r}, size={len(self)}, seed={self.seed})"


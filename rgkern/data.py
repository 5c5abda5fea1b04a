"""Datasets for rgkern: the synthetic MSDS1/MSDS2 sets, CIFAR-10 and image folders.

Conventions shared by every dataset in this module
--------------------------------------------------
* Every dataset is a :class:`torch.utils.data.Dataset` whose ``__getitem__``
  returns **only the image**: a ``torch.uint8`` tensor of shape ``(C, L, L)``
  (channels first, ``C = 3`` for RGB, ``C = 1`` for greyscale), values 0..255.
  A :class:`torch.utils.data.DataLoader` therefore yields ``(B, C, L, L)``
  uint8 batches; dequantisation / scaling is done elsewhere
  (``rgkern.preprocess``).
* Images are loaded (or generated) eagerly in the constructor and kept in
  ``dataset.images``, a contiguous ``torch.uint8`` tensor ``(N, C, L, L)``.
  Labels, where a dataset has them, are attributes (``dataset.labels``).
* Bad arguments raise :class:`ValueError` naming the value received and what
  was expected.  Missing data raises :class:`DataNotFoundError`, which is both
  a :class:`FileNotFoundError` and a :class:`ValueError`.

MSDS1 / MSDS2 (paper sec. 4.1 and appendix B; DESIGN.md sec. 7)
-----------------------------------------------------------------
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
import pickle
import tempfile
from numbers import Integral
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "DataNotFoundError",
    "MSDS_SPLIT_SIZES",
    "MSDS_IMAGE_SIZE",
    "generate_msds",
    "MSDS",
    "CIFAR10",
    "ImageFolder",
    "IMAGE_EXTENSIONS",
    "DATASET_NAMES",
    "load_dataset",
]


class DataNotFoundError(FileNotFoundError, ValueError):
    """A data folder or file is missing.

    Subclasses both :class:`FileNotFoundError` and :class:`ValueError`, so
    callers catching either (or :class:`OSError`) handle it.  ``str(err)`` is
    the full message; ``err.path`` is the missing path (or ``None``).
    """

    def __init__(self, message: str, path: Optional[Union[str, os.PathLike]] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


# --------------------------------------------------------------------------- #
# Argument checking helpers
# --------------------------------------------------------------------------- #

def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_split(split) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_size(size, total: int, what: str) -> int:
    """``size`` None -> ``total``; else a positive int <= total."""
    if size is None:
        return total
    if not _is_int(size) or size <= 0 or size > total:
        raise ValueError(
            f"size must be None or a positive int <= {total} (the size of {what}), "
            f"got {size!r}")
    return int(size)


# --------------------------------------------------------------------------- #
# MSDS1 / MSDS2
# --------------------------------------------------------------------------- #

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
    if not _is_int(kind) or int(kind) not in (1, 2):
        raise ValueError(f"kind must be 1 (MSDS1) or 2 (MSDS2), got {kind!r}")
    return int(kind)


def _check_seed(seed) -> int:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _msds_indices(indices_or_count, split: str) -> np.ndarray:
    total = MSDS_SPLIT_SIZES[split]
    if _is_int(indices_or_count):
        count = int(indices_or_count)
        if count < 0 or count > total:
            raise ValueError(
                f"image count must be an int in [0, {total}] for the {split!r} split, "
                f"got {indices_or_count!r}")
        return np.arange(count, dtype=np.int64)
    try:
        idx = np.asarray(indices_or_count)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(
            f"indices_or_count must be an int or a 1-D sequence of ints, got "
            f"{indices_or_count!r}") from exc
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            "indices_or_count must be an int or a 1-D sequence of ints, got an array "
            f"of shape {idx.shape} and dtype {idx.dtype}")
    bad = (idx < 0) | (idx >= total)
    if bad.any():
        raise ValueError(
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


def generate_msds(kind: int, indices_or_count, seed: int = 0, split: str = "train",
                  progress: bool = False) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
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
    split = _check_split(split)
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


class MSDS(Dataset):
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
        self.split = _check_split(split)
        self.seed = _check_seed(seed)
        n = _check_size(size, MSDS_SPLIT_SIZES[self.split],
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, **{f"label_{k}": v for k, v in labels.items()})
            os.replace(tmp, path)      # atomic: concurrent readers never see half a file
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"MSDS(kind={self.kind}, split={self.split!r}, size={len(self)}, seed={self.seed})"


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# Globals a CIFAR-10 pickle legitimately needs (numpy array reconstruction and
# Python 2 byte strings); anything else is refused, so a tampered file cannot
# run code.
_SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} (not part of a CIFAR-10 batch)")


def _get(d: dict, key: str):
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as exc:
        raise ValueError(
            f"cannot read CIFAR-10 batch {path}: not a valid CIFAR-10 python pickle "
            f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 batch {path} holds a {type(batch).__name__}, "
                         "expected a dict with b'data' and b'labels'")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise ValueError(f"CIFAR-10 batch {path} lacks b'data' or b'labels' "
                         f"(keys: {sorted(map(repr, batch))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-10 batch {path}: b'data' has shape {data.shape} and "
                         f"dtype {data.dtype}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 batch {path}: {labels.shape} labels for "
                         f"{data.shape[0]} images")
    # Rows are row-major (3, 32, 32): 1024 red, then 1024 green, then 1024 blue.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _find_cifar_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DataNotFoundError(
            f"CIFAR-10 folder {root} does not exist; expected a folder holding "
            f"{', '.join(_CIFAR_FILES['train'] + _CIFAR_FILES['test'])} (the python "
            f"version of CIFAR-10) or its parent containing {_CIFAR_FOLDER}/", root)
    for candidate in (root, root / _CIFAR_FOLDER):
        if all((candidate / name).is_file() for name in _CIFAR_FILES[split]):
            return candidate
    folder = root / _CIFAR_FOLDER if (root / _CIFAR_FOLDER).is_dir() else root
    missing = [name for name in _CIFAR_FILES[split] if not (folder / name).is_file()]
    raise DataNotFoundError(
        f"CIFAR-10 {split} batch file(s) missing in {folder}: {', '.join(missing)} "
        f"(expected {', '.join(_CIFAR_FILES[split])}, either in {root} or in "
        f"{root / _CIFAR_FOLDER})", folder / missing[0])


class CIFAR10(Dataset):
    """CIFAR-10 from the standard python pickles.

    ``CIFAR10(root, split="train", size=None)``

    ``root`` is the ``cifar-10-batches-py`` folder itself or its parent.  The
    train split reads ``data_batch_1`` .. ``data_batch_5`` (50,000 images), the
    test split ``test_batch`` (10,000 images); each is a pickle of a dict with
    ``b"data"`` (uint8 ``(N, 3072)``, each row a row-major ``(3, 32, 32)``
    CHW image) and ``b"labels"``.  Pickles are read with a restricted
    unpickler that only admits numpy array reconstruction.  ``size``: None or
    a positive int (keep the first ``size`` images).

    Attributes: ``images`` -- ``torch.uint8`` ``(N, 3, 32, 32)``; ``labels`` --
    ``np.int64`` ``(N,)`` class indices; ``classes`` -- class names; ``root`` --
    the batch folder used.  ``ds[i]`` is ``images[i]``.

    Raises :class:`DataNotFoundError` for a missing folder or batch file and
    :class:`ValueError` (naming the file) for a corrupt batch.
    """

    classes = CIFAR10_CLASSES

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 size: Optional[int] = None):
        self.split = _check_split(split)
        self.root = _find_cifar_dir(Path(root), self.split)
        parts = [_read_cifar_batch(self.root / name) for name in _CIFAR_FILES[self.split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        n = _check_size(size, len(images), f"the CIFAR-10 {self.split!r} split")
        self.images = torch.from_numpy(np.ascontiguousarray(images[:n]))
        self.labels = labels[:n]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"CIFAR10(root={str(self.root)!r}, split={self.split!r}, size={len(self)})"


# --------------------------------------------------------------------------- #
# Image folder
# --------------------------------------------------------------------------- #

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _list_images(root: Path) -> List[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: Pillow's convert would clip at 255; rescale instead.
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.round(arr / 257.0).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")        # avoids Pillow's palette-transparency warning
    return im if im.mode == mode else im.convert(mode)


def _load_image(path: Path, mode: str, image_size: Optional[int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            im = _to_mode(im, mode)
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if image_size is not None:
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != image_size:
            im = im.resize((image_size, image_size), resample=_BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageFolder(Dataset):
    """Every image file under a folder, as uint8 ``(C, L, L)`` tensors.

    ``ImageFolder(root, image_size=None, channels=3, size=None, progress=False)``

    Files with the extensions in :data:`IMAGE_EXTENSIONS` (case-insensitive)
    are found recursively and sorted by their path relative to ``root`` (so
    the order is deterministic), read with Pillow and converted to RGB
    (``channels=3``) or greyscale "L" (``channels=1``) with Pillow's
    ``convert`` (an alpha channel is dropped, not composited; 16-bit
    greyscale is rescaled to 8 bits; a GIF gives its first frame).  With ``image_size``
    each image is centre-cropped to a square (side = its shorter edge) and
    resized to ``image_size`` x ``image_size`` with bicubic resampling; with
    ``image_size=None`` all images must already be square and of one size.
    ``size``: None, or a positive int (keep the first ``size`` files).

    Attributes: ``images`` -- ``torch.uint8`` ``(N, C, L, L)``; ``files`` --
    list of :class:`pathlib.Path`, in dataset order.  ``ds[i]`` is
    ``images[i]``.

    Raises :class:`DataNotFoundError` if ``root`` does not exist,
    :class:`ValueError` if it holds no images, an image cannot be read (the
    message names the file), or (with ``image_size=None``) an image is not
    square or differs in size from the first.
    """

    def __init__(self, root: Union[str, os.PathLike], image_size: Optional[int] = None,
                 channels: int = 3, size: Optional[int] = None, progress: bool = False):
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
        if image_size is not None and (not _is_int(image_size) or image_size <= 0):
            raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder {self.root} does not exist "
                                    "(or is not a folder)", self.root)
        files = _list_images(self.root)
        if not files:
            raise ValueError(f"no image files found in {self.root} (looked recursively for "
                             f"extensions {', '.join(IMAGE_EXTENSIONS)}, any case)")
        n = _check_size(size, len(files), f"the {len(files)} images in {self.root}")
        self.files = files[:n]
        self.channels = int(channels)
        self.image_size = image_size
        mode = "RGB" if channels == 3 else "L"
        arrays = []
        for path in tqdm(self.files, desc=f"images in {self.root.name}", unit="img",
                         disable=not progress, leave=False):
            arr = _load_image(path, mode, image_size)
            if image_size is None:
                h, w = arr.shape[1:]
                if h != w:
                    raise ValueError(
                        f"image {path} is {w}x{h} (width x height), not square; pass "
                        "image_size to centre-crop and resize")
                if arrays and arrays[0].shape != arr.shape:
                    s0 = arrays[0].shape[1]
                    raise ValueError(
                        f"image {path} is {w}x{h} but {self.files[0]} is {s0}x{s0}; all "
                        "images must have one size, or pass image_size to resize them")
            arrays.append(arr)
        self.images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, size={len(self)}, "
                f"image_size={self.images.shape[-1]}, channels={self.channels})")


# --------------------------------------------------------------------------- #
# Factory
# --------------------------------------------------------------------------- #

DATASET_NAMES = ("msds1", "msds2", "cifar10", "folder")


def load_dataset(name: str, root: Optional[Union[str, os.PathLike]] = None,
                 split: str = "train", size: Optional[int] = None, seed: int = 0,
                 image_size: Optional[int] = None, progress: bool = True) -> Dataset:
    """Build a dataset by name.  Every item is a uint8 ``(C, L, L)`` tensor.

    * ``"msds1"`` / ``"msds2"``: :class:`MSDS` (generated; ``seed`` and
      ``size`` apply).  ``root``, if given, is used as a cache folder for the
      generated arrays.
    * ``"cifar10"``: :class:`CIFAR10` from ``root`` (required).
    * ``"folder"``: :class:`ImageFolder` (RGB) on ``root/<split>`` if that
      sub-folder exists, otherwise on ``root`` itself -- but only for
      ``split="train"`` and when ``root`` has no ``test`` sub-folder; other
      cases raise :class:`DataNotFoundError` rather than silently mixing
      training and test images.

    ``size`` keeps the first ``size`` images (all datasets).  ``image_size``
    resizes folder images; MSDS and CIFAR-10 are 32x32, so for them it must be
    None or 32.  ``seed`` only affects MSDS.  ``name`` is case-insensitive.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    split = _check_split(split)
    if key in ("msds1", "msds2", "cifar10") and image_size not in (None, 32):
        raise ValueError(f"{key} images are 32x32; image_size must be None or 32, "
                         f"got {image_size!r}")
    if key in ("msds1", "msds2"):
        return MSDS(kind=int(key[-1]), split=split, size=size, seed=seed,
                    progress=progress, cache_dir=root)
    if root is None:
        raise ValueError(f"dataset {key!r} needs root (the folder holding its files), got None")
    if key == "cifar10":
        return CIFAR10(root, split=split, size=size)
    folder = Path(root)
    if (folder / split).is_dir():
        folder = folder / split
    elif split != "train" or (folder / "test").is_dir():
        raise DataNotFoundError(
            f"no {split!r} sub-folder in {folder}; for split={split!r} the folder dataset "
            f"reads {folder / split}" + (
                "" if split != "train" else
                f" (or {folder} itself, but it has a 'test' sub-folder whose images "
                "must not be mixed into the training set)"), folder / split)
    return ImageFolder(folder, image_size=image_size, channels=3, size=size, progress=progress)

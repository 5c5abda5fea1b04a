"""MNIST from the standard idx files, zero-padded from 28x28 to 32x32 (one channel)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

from ..core.errors import InputError
from .base import DataNotFoundError, ImageDataset, check_size, check_split

__all__ = ["MNIST", "MNIST_FILES", "read_idx"]

#: Base names of the image and label files of each split (also found with a ``.`` in place of
#: the ``-`` before ``idx``, and gzip-compressed with ``.gz``).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC = 0x00000803   # unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801   # unsigned bytes, 1 dimension
_SIDE, _PAD = 28, 2


def _variants(base: str) -> List[str]:
    dotted = base.replace("-idx", ".idx")
    return [base, dotted, base + ".gz", dotted + ".gz"]


def _search_folders(root: Path) -> List[Path]:
    """``root`` and the layouts of torchvision and of the authors' script below it."""
    return [root, root / "raw", root / "MNIST" / "raw", root / "mnist", root / "mnist" / "MNIST" / "raw"]


def _find(folders: List[Path], base: str) -> Optional[Path]:
    for folder in folders:
        for name in _variants(base):
            if (folder / name).is_file():
                return folder / name
    return None


#: The most data bytes an idx file may declare: MNIST's largest, the 60,000 training images,
#: hold 47,040,000. A header that declares more is refused before anything is decompressed.
MAX_IDX_BYTES = 2**28
# Trailing bytes read past the declared data to count them (a bound: a file with more says "at least").
_TRAILING_PROBE = 2**20


def read_idx(path: Union[str, os.PathLike], magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """The uint8 array of an idx file (optionally gzip-compressed) whose magic number must be ``magic``.

    The idx format: a big-endian int32 magic number ``0x0000 08 D`` (``08``: unsigned
    bytes; ``D``: the number of dimensions), ``D`` big-endian int32 sizes, then the data in
    row-major order. Raises :class:`ValueError` naming the file and the value found for a
    wrong magic number, a header or data shorter than the sizes say, trailing bytes, or a
    header that declares more than ``max_bytes`` of data. The file is read as a stream, the
    header first: a gzip file is decompressed only as far as its header says (plus a bounded
    look for trailing bytes), so a small file that inflates to gigabytes costs nothing.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise InputError(f"MNIST file {path} is {len(head)} bytes long, too short for an idx "
                                 "header (truncated?)")
            found = int.from_bytes(head, "big")
            if found != magic:
                hint = ""
                if head[:2] == b"\x1f\x8b":
                    hint = "; it looks gzip-compressed: name it with a .gz suffix"
                raise InputError(
                    f"MNIST file {path} has magic number {found} (0x{found:08x}), expected {magic} "
                    f"(0x{magic:08x}: unsigned bytes, {magic & 0xFF} dimension(s)){hint}")
            ndim = magic & 0xFF
            header = 4 + 4 * ndim
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise InputError(f"MNIST file {path} is {4 + len(sizes)} bytes long, shorter than its "
                                 f"{header}-byte header (truncated)")
            shape = tuple(int.from_bytes(sizes[4 * i: 4 + 4 * i], "big") for i in range(ndim))
            expected = int(np.prod(shape))
            if expected > max_bytes:
                raise InputError(
                    f"MNIST file {path}: its header gives shape {shape} ({expected:,} bytes of data), more than "
                    f"the {max_bytes:,} an idx file of MNIST may hold; not an MNIST file")
            data = f.read(expected + _TRAILING_PROBE)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(f"cannot decompress MNIST file {path}: {type(exc).__name__}: {exc}") from exc
    if len(data) < expected:
        raise InputError(
            f"MNIST file {path} is truncated: its header gives shape {shape} "
            f"({expected} bytes of data) but it holds {len(data)}")
    if len(data) > expected:
        trailing = len(data) - expected
        count = f"at least {trailing}" if trailing == _TRAILING_PROBE else str(trailing)
        raise InputError(
            f"MNIST file {path} has {count} bytes after the {expected} bytes of "
            f"data its header gives (shape {shape}); not an idx file of that shape")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _read_images(path: Path) -> np.ndarray:
    images = read_idx(path, _IMAGE_MAGIC)
    if images.shape[1:] != (_SIDE, _SIDE):
        raise InputError(f"MNIST image file {path} holds images of {images.shape[1]}x"
                         f"{images.shape[2]} pixels, expected {_SIDE}x{_SIDE}")
    if images.shape[0] == 0:
        raise InputError(f"MNIST image file {path} holds no images")
    return images


def _read_labels(path: Path, count: int) -> np.ndarray:
    labels = read_idx(path, _LABEL_MAGIC)
    if labels.shape != (count,):
        raise InputError(f"MNIST label file {path} holds {labels.shape[0]} labels for "
                         f"{count} images")
    return labels.astype(np.int64)


class MNIST(ImageDataset):
    """MNIST digits from the standard idx files, zero-padded to 32x32, one channel.

    ``MNIST(root, split="train", size=None)``

    ``split="train"`` reads ``train-images-idx3-ubyte`` (60,000 images), ``"test"``
    ``t10k-images-idx3-ubyte`` (10,000), each optionally as ``.gz`` and also under the
    ``train-images.idx3-ubyte`` spelling; found in ``root`` or in ``root/raw``,
    ``root/MNIST/raw`` (torchvision's layout), ``root/mnist`` or ``root/mnist/MNIST/raw``.
    The 28x28 digits get a border of 2 zero (background) pixels on every side, as the
    authors' ``mnist32`` data, so ``L = 32 = 4 * 2**3``. The label file of the split, where
    present beside the images, gives ``labels``. ``size``: None, or a positive int (keep the
    first ``size`` images).

    Attributes: ``images`` -- ``torch.uint8`` ``(N, 1, 32, 32)``; ``labels`` -- ``np.int64``
    ``(N,)`` or None; ``file`` -- the image file read. ``ds[i]`` is ``images[i]``.

    Raises :class:`DataNotFoundError` when the image file is missing and
    :class:`ValueError` naming the file and the value found for a wrong magic number, a
    truncated file, images that are not 28x28, or a label count that does not match.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 size: Optional[int] = None):
        self.split = check_split(split)
        root = Path(root)
        image_base, label_base = MNIST_FILES[self.split]
        folders = _search_folders(root)
        path = _find(folders, image_base)
        if path is None:
            raise DataNotFoundError(
                f"MNIST {self.split} images not found: expected {image_base} (or "
                f"{image_base.replace('-idx', '.idx')}, either optionally .gz) in "
                f"{', '.join(str(f) for f in folders)}", root / image_base)
        self.file = path
        images = _read_images(path)
        label_path = _find([path.parent], label_base)
        labels = None if label_path is None else _read_labels(label_path, len(images))
        n = check_size(size, len(images), f"the MNIST {self.split!r} split ({path})")
        padded = np.zeros((n, 1, _SIDE + 2 * _PAD, _SIDE + 2 * _PAD), dtype=np.uint8)
        padded[:, 0, _PAD:_PAD + _SIDE, _PAD:_PAD + _SIDE] = images[:n]
        self.images = torch.from_numpy(padded)
        self.labels = None if labels is None else labels[:n]

    def __repr__(self) -> str:
        return f"MNIST(file={str(self.file)!r}, split={self.split!r}, size={len(self)})"

"""Every image file under a folder, as a dataset of uint8 ``(C, L, L)`` tensors."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.errors import InputError
from .base import DataNotFoundError, ImageDataset, check_size, is_int

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS"]

_BICUBIC = Image.Resampling.BICUBIC

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _list_images(root: Path) -> List[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / name
                # A FIFO or device named like an image would block the loader (or read forever).
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError as error:  # e.g. a link to nothing
                    raise InputError(f"cannot read image {path}: {error.strerror or error}") from None
                if not regular:
                    raise InputError(f"{path} is not a regular file (a FIFO, socket or device); move it out of the image folder")
                files.append(path)
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
        raise InputError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if image_size is not None:
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != image_size:
            im = im.resize((image_size, image_size), resample=_BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageFolder(ImageDataset):
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
            raise InputError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
        if image_size is not None and (not is_int(image_size) or image_size <= 0):
            raise InputError(f"image_size must be None or a positive int, got {image_size!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder {self.root} does not exist "
                                    "(or is not a folder)", self.root)
        files = _list_images(self.root)
        if not files:
            raise InputError(f"no image files found in {self.root} (looked recursively for "
                             f"extensions {', '.join(IMAGE_EXTENSIONS)}, any case)")
        n = check_size(size, len(files), f"the {len(files)} images in {self.root}")
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
                    raise InputError(
                        f"image {path} is {w}x{h} (width x height), not square; pass "
                        "image_size to centre-crop and resize")
                if arrays and arrays[0].shape != arr.shape:
                    s0 = arrays[0].shape[1]
                    raise InputError(
                        f"image {path} is {w}x{h} but {self.files[0]} is {s0}x{s0}; all "
                        "images must have one size, or pass image_size to resize them")
            arrays.append(arr)
        self.images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))

    def __repr__(self) -> str:
        return (f"ImageFolder(root={str(self.root)!r}, size={len(self)}, "
                f"image_size={self.images.shape[-1]}, channels={self.channels})")


"""CelebA from the aligned JPEGs (``img_align_celeba``), preprocessed as in the paper.

The paper (appendix A) and the authors' training script centre-crop the aligned 178x218
images to 148x148 and resize them to 32x32; here the resize is Pillow's bicubic (antialiased,
so every source pixel counts). The random horizontal flip the paper also applies is a
training option (``TrainConfig.hflip``), not part of the dataset, so the held-out images stay fixed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.errors import InputError
from .base import DataNotFoundError, ImageDataset, check_size, is_int

__all__ = ["CelebA", "CELEBA_FOLDER", "CELEBA_PARTITION_FILES", "CELEBA_SPLITS"]

CELEBA_FOLDER = "img_align_celeba"
#: The standard partition file (whitespace-separated, as distributed by the CelebA authors) and
#: the comma-separated copy with an ``image_id,partition`` header found in other mirrors.
CELEBA_PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
#: Partition codes of the partition file for each split.
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
_EXTENSIONS = (".jpg", ".jpeg", ".png")
_BICUBIC = Image.Resampling.BICUBIC


def _holds_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith(_EXTENSIONS) and e.is_file() for e in entries)
    except OSError:
        return False


def _find_image_folder(root: Path) -> Path:
    """``root`` itself, ``root/img_align_celeba`` or ``root/celeba/img_align_celeba``."""
    if not root.is_dir():
        raise DataNotFoundError(
            f"CelebA folder {root} does not exist; expected the {CELEBA_FOLDER} folder of aligned "
            f"JPEGs or a folder holding it", root)
    for candidate in (root / CELEBA_FOLDER, root / "celeba" / CELEBA_FOLDER):
        if candidate.is_dir():
            return candidate
    if _holds_images(root):
        return root
    raise DataNotFoundError(
        f"no CelebA images in {root}: expected JPEG files there, or a sub-folder "
        f"{CELEBA_FOLDER}/ (or celeba/{CELEBA_FOLDER}/) holding them", root / CELEBA_FOLDER)


def _find_partition_file(images: Path) -> Optional[Path]:
    """The partition file beside the image folder, in it, or in an ``Eval`` folder nearby."""
    for folder in (images.parent, images, images.parent / "Eval", images.parent.parent / "Eval"):
        for name in CELEBA_PARTITION_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_partition(path: Path) -> List[Tuple[str, int]]:
    """``(file name, partition code)`` for every line of a partition file, in file order."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise InputError(f"CelebA partition file {path} is not text ({exc})") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or (number == 1 and fields == ["image_id", "partition"]):
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise InputError(
                f"CelebA partition file {path}, line {number}: {line.strip()!r}; expected "
                "'<image file> <0|1|2>' (0 train, 1 valid, 2 test)")
        entries.append((fields[0], int(fields[1])))
    if not entries:
        raise InputError(f"CelebA partition file {path} lists no images")
    return entries


def _load_celeba_image(path: Path, crop: int, image_size: int) -> np.ndarray:
    """uint8 ``(3, image_size, image_size)``: the centre ``crop`` x ``crop`` square, resized bicubically."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im if im.mode == "RGB" else im.convert("RGB")
    except Exception as exc:
        raise InputError(f"cannot read CelebA image {path}: {type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w < crop or h < crop:
        raise InputError(f"CelebA image {path} is {w}x{h} (width x height), smaller than the "
                         f"{crop}x{crop} centre crop")
    left, top = (w - crop) // 2, (h - crop) // 2
    im = im.crop((left, top, left + crop, top + crop))
    if crop != image_size:
        im = im.resize((image_size, image_size), resample=_BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


class CelebA(ImageDataset):
    """CelebA faces from the aligned JPEGs, centre-cropped and resized as in the paper.

    ``CelebA(root, split="train", size=None, image_size=32, crop=148, progress=False)``

    ``root`` is the ``img_align_celeba`` folder itself, a folder holding it, or a folder
    holding ``celeba/img_align_celeba`` (the authors' ``--data_path`` layout). Each image is
    converted to RGB, cropped to its centre ``crop`` x ``crop`` square (offsets
    ``(w - crop) // 2`` and ``(h - crop) // 2``: 15 and 35 for the aligned 178x218 images)
    and resized to ``image_size`` x ``image_size`` with Pillow's bicubic filter.

    Splits. With the standard partition file ``list_eval_partition.txt`` (or the ``.csv``
    copy; looked for beside the image folder, in it, or in an ``Eval`` folder next to it),
    ``"train"`` is partition 0 (162,770 images of the full set), ``"valid"`` partition 1 and
    ``"test"`` partition 2 (19,962), in the file's order; every listed image of the split
    must exist. Without the file the images of the folder (``.jpg``, ``.jpeg``, ``.png``) are
    sorted by name, the last ``N // 10`` are ``"test"`` and the rest ``"train"`` (there is no
    ``"valid"``); for the full set that is not the standard partition, so figures are
    comparable with published ones only with the file. ``size``: None, or a positive int
    (keep the first ``size`` images of the split; only those are decoded).

    Attributes: ``images`` -- ``torch.uint8`` ``(N, 3, image_size, image_size)``;
    ``files`` -- the image paths in dataset order; ``partition_file`` -- the partition
    file used, or None. ``ds[i]`` is ``images[i]``.

    Raises :class:`DataNotFoundError` for a missing folder, an empty one, or a listed image
    that is missing, and :class:`ValueError` naming the file for an image that cannot be
    decoded, one smaller than the crop, or a malformed partition file.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train",
                 size: Optional[int] = None, image_size: int = 32, crop: int = 148,
                 progress: bool = False):
        if split not in CELEBA_SPLITS:
            raise InputError(f"CelebA split must be one of {', '.join(map(repr, CELEBA_SPLITS))}, "
                             f"got {split!r}")
        for name, value in (("image_size", image_size), ("crop", crop)):
            if not is_int(value) or value <= 0:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        self.split = split
        self.crop, self.image_size = int(crop), int(image_size)
        self.root = _find_image_folder(Path(root))
        self.partition_file = _find_partition_file(self.root)
        files = self._split_files()
        what = f"the CelebA {split!r} split ({len(files)} images in {self.root})"
        n = check_size(size, len(files), what)
        self.files = files[:n]
        arrays = [
            _load_celeba_image(path, self.crop, self.image_size)
            for path in tqdm(self.files, desc=f"CelebA {split}", unit="img",
                             disable=not progress, leave=False)
        ]
        self.images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))

    def _split_files(self) -> List[Path]:
        present = sorted(e.name for e in os.scandir(self.root)
                         if e.name.lower().endswith(_EXTENSIONS) and e.is_file())
        if self.partition_file is None:
            if self.split == "valid":
                raise InputError(
                    f"the CelebA 'valid' split needs the partition file "
                    f"{CELEBA_PARTITION_FILES[0]} (none found beside {self.root})")
            if not present:
                raise DataNotFoundError(f"no CelebA images (.jpg, .jpeg, .png) in {self.root}",
                                        self.root)
            n_test = len(present) // 10
            chosen = present[len(present) - n_test:] if self.split == "test" else present[:len(present) - n_test]
            if not chosen:
                raise InputError(
                    f"{self.root} holds {len(present)} image(s): too few for a {self.split!r} split "
                    f"(without {CELEBA_PARTITION_FILES[0]}, the last tenth of the sorted files is "
                    "the test split)")
            return [self.root / name for name in chosen]
        code = CELEBA_SPLITS[self.split]
        chosen = [name for name, part in _read_partition(self.partition_file) if part == code]
        if not chosen:
            raise InputError(f"CelebA partition file {self.partition_file} lists no images with "
                             f"partition {code} (the {self.split!r} split)")
        available = set(present)
        missing = [name for name in chosen if name not in available]
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} of the {len(chosen)} images of the CelebA {self.split!r} split "
                f"listed in {self.partition_file} are missing from {self.root}, the first "
                f"{missing[0]}", self.root / missing[0])
        return [self.root / name for name in chosen]

    def __repr__(self) -> str:
        return (f"CelebA(root={str(self.root)!r}, split={self.split!r}, size={len(self)}, "
                f"image_size={self.image_size}, crop={self.crop})")

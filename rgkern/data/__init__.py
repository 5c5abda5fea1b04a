"""Datasets for rgkern: the synthetic MSDS1/MSDS2 sets, CIFAR-10, CelebA, MNIST and image folders.

Conventions shared by every dataset in this package
---------------------------------------------------
* Every dataset is a :class:`torch.utils.data.Dataset` whose ``__getitem__``
  returns **only the image**: a ``torch.uint8`` tensor of shape ``(C, L, L)``
  (channels first, ``C = 3`` for RGB, ``C = 1`` for greyscale), values 0..255.
  A :class:`torch.utils.data.DataLoader` therefore yields ``(B, C, L, L)``
  uint8 batches; dequantisation / scaling is done elsewhere
  (``rgkern.preprocess``).
* Images are loaded (or generated) eagerly in the constructor and kept in
  ``dataset.images``, a contiguous ``torch.uint8`` tensor ``(N, C, L, L)``.
  Labels, where a dataset has them, are attributes (``dataset.labels``).
* Bad arguments raise :class:`rgkern.core.errors.InputError` (a
  :class:`ValueError`) naming the value received and what was expected.
  Missing data raises :class:`DataNotFoundError`, which is both a
  :class:`FileNotFoundError` and an ``InputError``.

The datasets: :class:`MSDS` (``msds``: the synthetic MSDS1 / MSDS2 of the paper, generated
with the authors' parameters), :class:`CIFAR10` (``cifar``), :class:`CelebA` (``celeba``: the
aligned JPEGs with the paper's crop and resize), :class:`MNIST` (``mnist``: the idx files,
padded to 32x32) and :class:`ImageFolder` (``folder``); :func:`load_dataset` builds one by name. Of the rest of rgkern this package
imports only :mod:`rgkern.core.errors` (which imports nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from torch.utils.data import Dataset

from ..core.errors import InputError
from .base import DataNotFoundError, check_split
from .celeba import CelebA
from .cifar import CIFAR10, CIFAR10_CLASSES
from .folder import IMAGE_EXTENSIONS, ImageFolder
from .mnist import MNIST
from .msds import MSDS, MSDS_IMAGE_SIZE, MSDS_SPLIT_SIZES, generate_msds

__all__ = [
    "DataNotFoundError",
    "MSDS_SPLIT_SIZES",
    "MSDS_IMAGE_SIZE",
    "generate_msds",
    "MSDS",
    "CIFAR10",
    "CIFAR10_CLASSES",
    "CelebA",
    "MNIST",
    "ImageFolder",
    "IMAGE_EXTENSIONS",
    "DATASET_NAMES",
    "load_dataset",
]

DATASET_NAMES = ("msds1", "msds2", "cifar10", "celeba", "mnist", "folder")


def load_dataset(name: str, root: Optional[Union[str, os.PathLike]] = None,
                 split: str = "train", size: Optional[int] = None, seed: int = 0,
                 image_size: Optional[int] = None, progress: bool = True) -> Dataset:
    """Build a dataset by name.  Every item is a uint8 ``(C, L, L)`` tensor.

    * ``"msds1"`` / ``"msds2"``: :class:`MSDS` (generated; ``seed`` and
      ``size`` apply).  ``root``, if given, is used as a cache folder for the
      generated arrays.
    * ``"cifar10"``: :class:`CIFAR10` from ``root`` (required).
    * ``"celeba"``: :class:`CelebA` from ``root`` (required): the ``img_align_celeba``
      folder or its parent; centre crop 148x148, bicubic resize to ``image_size``
      (default 32); the split follows ``list_eval_partition.txt`` when present.
    * ``"mnist"``: :class:`MNIST` from ``root`` (required), padded to 32x32, one channel.
    * ``"folder"``: :class:`ImageFolder` (RGB) on ``root/<split>`` if that
      sub-folder exists, otherwise on ``root`` itself -- but only for
      ``split="train"`` and when ``root`` has no ``test`` sub-folder; other
      cases raise :class:`DataNotFoundError` rather than silently mixing
      training and test images.

    ``size`` keeps the first ``size`` images (all datasets).  ``image_size``
    resizes folder and CelebA images; MSDS, CIFAR-10 and MNIST are 32x32, so for
    them it must be None or 32.  ``seed`` only affects MSDS.  ``name`` is case-insensitive.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASET_NAMES:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    split = check_split(split)
    if key in ("msds1", "msds2", "cifar10", "mnist") and image_size not in (None, 32):
        raise InputError(f"{key} images are 32x32; image_size must be None or 32, "
                         f"got {image_size!r}")
    if key in ("msds1", "msds2"):
        return MSDS(kind=int(key[-1]), split=split, size=size, seed=seed,
                    progress=progress, cache_dir=root)
    if root is None:
        raise InputError(f"dataset {key!r} needs root (the folder holding its files), got None")
    if key == "cifar10":
        return CIFAR10(root, split=split, size=size)
    if key == "celeba":
        return CelebA(root, split=split, size=size, image_size=32 if image_size is None else image_size,
                      progress=progress)
    if key == "mnist":
        return MNIST(root, split=split, size=size)
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

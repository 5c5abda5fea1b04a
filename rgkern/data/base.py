"""What the datasets of :mod:`rgkern.data` share: the missing-data error, argument checks, a base class."""

from __future__ import annotations

import os
from numbers import Integral
from typing import Optional, Union

import torch
from torch.utils.data import Dataset

from ..core.errors import InputError, InputFileNotFoundError

__all__ = ["DataNotFoundError", "SizeTooLargeError", "ImageDataset", "is_int", "check_split", "check_size"]


class DataNotFoundError(InputFileNotFoundError):
    """A data folder or file is missing.

    An :class:`rgkern.core.errors.InputFileNotFoundError`: both a
    :class:`FileNotFoundError` and a :class:`ValueError`, so callers catching
    either (or :class:`OSError`) handle it.  ``str(err)`` is the full message;
    ``err.path`` is the missing path (or ``None``).
    """

    def __init__(self, message: str, path: Optional[Union[str, os.PathLike]] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class ImageDataset(Dataset):
    """A dataset held in memory: ``images`` is a uint8 tensor ``(N, C, L, L)`` and ``ds[i]`` is ``images[i]``."""

    images: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.images[index]


# --------------------------------------------------------------------------- #
# Argument checking helpers
# --------------------------------------------------------------------------- #

def is_int(value: object) -> bool:
    """True for an integer (a numpy one too) that is not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_split(split: object) -> str:
    """``split`` itself if it is "train" or "test"."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    return split


class SizeTooLargeError(InputError):
    """A size larger than the split holds (``requested``, ``available``): a ``ValueError``."""

    def __init__(self, message: str, requested: int, available: int):
        super().__init__(message)
        self.requested, self.available = requested, available


def check_size(size: object, total: int, what: str) -> int:
    """``size`` None -> ``total``; else a positive int <= total (:class:`SizeTooLargeError` if larger)."""
    if size is None:
        return total
    if is_int(size) and size > total:
        raise SizeTooLargeError(
            f"size must be None or a positive int <= {total} (the size of {what}), got {size!r}", int(size), total)
    if not is_int(size) or size <= 0 or size > total:
        raise InputError(
            f"size must be None or a positive int <= {total} (the size of {what}), "
            f"got {size!r}")
    return int(size)


"""CIFAR-10 from the standard python pickles, read with an unpickler that admits only numpy arrays."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..core.errors import InputError
from .base import DataNotFoundError, ImageDataset, check_size, check_split

__all__ = ["CIFAR10", "CIFAR10_CLASSES"]

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
        raise InputError(
            f"cannot read CIFAR-10 batch {path}: not a valid CIFAR-10 python pickle "
            f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise InputError(f"CIFAR-10 batch {path} holds a {type(batch).__name__}, "
                         "expected a dict with b'data' and b'labels'")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise InputError(f"CIFAR-10 batch {path} lacks b'data' or b'labels' "
                         f"(keys: {sorted(map(repr, batch))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InputError(f"CIFAR-10 batch {path}: b'data' has shape {data.shape} and "
                         f"dtype {data.dtype}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise InputError(f"CIFAR-10 batch {path}: {labels.shape} labels for "
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


class CIFAR10(ImageDataset):
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
        self.split = check_split(split)
        self.root = _find_cifar_dir(Path(root), self.split)
        parts = [_read_cifar_batch(self.root / name) for name in _CIFAR_FILES[self.split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        n = check_size(size, len(images), f"the CIFAR-10 {self.split!r} split")
        self.images = torch.from_numpy(np.ascontiguousarray(images[:n]))
        self.labels = labels[:n]

    def __repr__(self) -> str:
        return f"CIFAR10(root={str(self.root)!r}, split={self.split!r}, size={len(self)})"


"""Drawing images from a trained model in batches, and writing them as a PNG grid and ``.npz``.

Latents are drawn on the CPU from a CPU ``torch.Generator`` and then moved to the model's
device, one batch at a time. So a seed gives the same latents on every device and for every
``batch_size``: sampling 1,000 images in batches of 100 draws exactly the latents of one
batch of 1,000. (Decoding different batch sizes can still round differently in the last
float bit; see the tests.)
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .plots import save_image_grid
from .preprocess import postprocess

__all__ = ["sample_images", "write_samples", "parse_temperature"]


def parse_temperature(text: str):
    """``"0.8"`` -> ``0.8``; ``"0.2,0.6,0.6,0.6"`` -> ``[0.2, 0.6, 0.6, 0.6]`` (one per RG level).

    Only the syntax is checked here; the model checks the number of levels and the values.
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"temperature must be a number or a comma-separated list of numbers (one per RG level), got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _sampling_generator(generator, seed) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (latents are drawn on the CPU), got {generator!r}"
        )
    return generator


def sample_images(
    model,
    num: int,
    batch_size: int = 256,
    temperature=1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield ``num`` samples of ``model`` as uint8 CPU batches ``(b, C, L, L)``, ``b <= batch_size``.

    Args:
        model: an :class:`rgkern.RGFlow` (any device and dtype).
        num: number of images in all. batch_size: images decoded at once.
        temperature: a float, or one per RG level (see :meth:`RGFlow.temperature_map`).
        generator: a CPU ``torch.Generator`` for the latents, or ``seed`` to make one (neither:
            a random seed).
        progress: show a tqdm bar.

    Runs under ``torch.inference_mode()``; only one batch lives on the device at a time.
    Arguments (including the temperature's length and values) are checked before the first
    batch is drawn, when this function is called.
    """
    num = _check_positive_int("num", num)
    batch_size = _check_positive_int("batch_size", batch_size)
    model.temperature_map(temperature, device="cpu")  # raises ValueError/TypeError for a bad temperature
    generator = _sampling_generator(generator, seed)
    return _sample_batches(model, num, batch_size, temperature, generator, progress)


def _sample_batches(model, num, batch_size, temperature, generator, progress):
    from tqdm.auto import tqdm

    param = next(model.parameters())
    latent_dtype = param.dtype if param.dtype == torch.float64 else torch.float32
    with tqdm(total=num, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            with torch.inference_mode():
                z = model.sample_latents(count, temperature, generator=generator, device="cpu", dtype=latent_dtype)
                x = model.decode(z.to(device=param.device, dtype=param.dtype))
                images = postprocess(x).cpu()
            bar.update(count)
            yield images


class _NpyStream:
    """Writes one uint8 array ``images`` of known shape into an ``.npz`` batch by batch."""

    def __init__(self, path: Path, shape):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.shape = tuple(shape)
        self.written = 0
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zip.open("images.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.member, header)

    def write(self, batch: np.ndarray):
        self.member.write(np.ascontiguousarray(batch).tobytes())
        self.written += batch.shape[0]

    def close(self, ok: bool):
        self.member.close()
        self.zip.close()
        if ok and self.written == self.shape[0]:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def write_samples(
    model,
    num: int = 64,
    png=None,
    npz=None,
    batch_size: int = 256,
    temperature=1.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    grid_size: int = 64,
    nrow: int | None = None,
    scale: int = 2,
    progress: bool = True,
) -> dict:
    """Sample ``num`` images and write them: a PNG grid of the first ``grid_size`` and/or all as ``.npz``.

    Args:
        png: path of the grid image (optional). npz: path of an ``.npz`` holding ``images``,
            uint8 ``(num, C, L, L)`` (optional); it is written batch by batch, so all images
            never sit in memory at once, and appears atomically when complete.
        nrow, scale: grid layout (see :func:`rgkern.plots.save_image_grid`).
        The rest as for :func:`sample_images`.

    Without ``npz`` only the first ``grid_size`` images are drawn.
    Returns ``{"png": Path | None, "npz": Path | None, "num": images drawn}``.
    """
    if png is None and npz is None:
        raise ValueError("give png and/or npz: there is nowhere to write the samples")
    grid_size = _check_positive_int("grid_size", grid_size)
    batches = sample_images(model, num, batch_size, temperature, generator=generator, seed=seed, progress=progress)
    shape = (num, model.channels, model.image_size, model.image_size)
    stream = _NpyStream(Path(npz), shape) if npz is not None else None
    grid: list[torch.Tensor] = []
    kept = drawn = 0
    ok = False
    try:
        for images in batches:
            drawn += images.shape[0]
            if kept < grid_size:
                grid.append(images[: grid_size - kept])
                kept += grid[-1].shape[0]
            if stream is not None:
                stream.write(images.numpy())
            elif kept >= grid_size:
                break
        ok = True
    finally:
        if stream is not None:
            stream.close(ok)
    if png is not None:
        png = save_image_grid(torch.cat(grid), png, nrow=nrow, scale=scale)
    return {"png": None if png is None else Path(png), "npz": None if npz is None else Path(npz), "num": drawn}

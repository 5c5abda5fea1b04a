"""Held-out bits/dim and the MSDS quality score of samples, as training records them.

:func:`evaluate_bpd` gives the held-out bits/dim with a fixed dequantisation noise: a CPU
generator re-seeded with :data:`EVAL_NOISE_SEED` at every evaluation, independent of the
training seed. The figure is therefore deterministic, comparable between runs and
evaluations, and still the usual variational estimate (uniform noise, not bin centres) that
the paper's tables report.

On MSDS data (:func:`quality_kind`) every evaluation of :class:`rgkern.tools.trainer.Trainer`
also records the MSDS quality score (:func:`rgkern.tools.quality.msds_quality`) of
:data:`QUALITY_SAMPLES` samples at each of the config's picture temperatures, drawn from a
CPU generator seeded with :data:`QUALITY_SEED` (fixed, like the held-out noise):
:func:`sample_quality`. Sampling touches no training state, so it changes nothing of the run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from ..core.errors import InputError
from ..core.preprocess import bits_per_dim, preprocess
from .quality import msds_quality
from .sampling import sample_images, temperature_label

if TYPE_CHECKING:
    from ..core.model import RGFlow, Temperature

__all__ = ["EVAL_NOISE_SEED", "QUALITY_SAMPLES", "QUALITY_SEED", "evaluate_bpd", "quality_kind", "sample_quality"]

EVAL_NOISE_SEED = 20_200_101
#: Samples per temperature of the quality score recorded at each evaluation on MSDS data,
#: and the seed of their latents (the same latents at every evaluation and in every run).
QUALITY_SAMPLES = 64
QUALITY_SEED = 20_200_102


@torch.no_grad()
def evaluate_bpd(model: RGFlow, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> float:
    """Mean bits/dim of uint8 ``images (N, C, L, L)`` under ``model``, deterministically.

    The dequantisation noise is drawn on the CPU from a generator seeded with
    :data:`EVAL_NOISE_SEED` (the same noise at every call, whatever the device or batch
    size), then moved to the model's device. Runs in the model's dtype; the data is
    preprocessed in float64 for a float64 model, in float32 otherwise.
    """
    from tqdm.auto import tqdm

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise InputError("images must be a non-empty uint8 tensor (N, C, L, L)")
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    data_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=torch.float64, device=param.device)
    for start in tqdm(range(0, len(images), batch_size), desc="held-out bits/dim", leave=False, disable=not progress):
        y, logdet = preprocess(images[start : start + batch_size].cpu(), generator=generator, dtype=data_dtype)
        y, logdet = y.to(param.device, param.dtype), logdet.to(param.device)
        total += bits_per_dim(model.log_prob(y), logdet, model.num_dims).double().sum()
    return float(total) / len(images)


def quality_kind(data: str, shape: Sequence[int] = (3, 32, 32)) -> int | None:
    """The ``kind`` of :func:`rgkern.tools.quality.msds_quality` for a dataset name: 1 or 2 for MSDS1 / MSDS2 images of ``shape`` ``(3, 32, 32)``, else None."""
    kind = {"msds1": 1, "msds2": 2}.get(str(data).lower())
    return kind if tuple(shape) == (3, 32, 32) else None


@torch.no_grad()
def sample_quality(
    model: RGFlow, kind: int, temperatures: Iterable[Temperature], num: int = QUALITY_SAMPLES, seed: int = QUALITY_SEED
) -> dict[str, dict]:
    """``{temperature_label(t): msds_quality(samples at t)}`` for ``num`` samples per temperature.

    Each temperature decodes the latents of one CPU generator seeded with ``seed`` (the same
    draw for every temperature and call, so the figures are deterministic); images whose
    decode is not finite count as they come out of :func:`rgkern.postprocess` (NaN as 0).
    """
    scores = {}
    for temperature in temperatures:
        batches = sample_images(model, num, batch_size=num, temperature=temperature, seed=seed, progress=False, allow_nonfinite=True)
        scores[temperature_label(temperature)] = msds_quality(torch.cat(list(batches)), kind=kind)
    return scores


def _quality_note(entry: dict) -> str:
    """``"; samples at T=1: 44% oval-sized blobs, colour spread 69"`` for an entry with a quality score (its first temperature), else ``""``."""
    if not entry.get("quality"):
        return ""
    label, score = next(iter(entry["quality"].items()))
    oval, spread = score.get("oval_fraction"), score.get("colour_spread")
    return (f"; samples at T={label}: " + ("n/a" if oval is None else f"{oval:.0%}") + " oval-sized blobs, colour spread "
            + ("n/a" if spread is None else f"{spread:.0f}"))

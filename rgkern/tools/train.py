"""Maximum-likelihood training of RG-Flow: :func:`train` runs a config in a run folder.

The loss is the mean negative log-likelihood of 8-bit images in bits per dimension
(:func:`rgkern.bits_per_dim`, which counts the preprocessing log-det), optimised with AdamW
(lr 1e-3, weight decay 5e-5) and gradient clipping at global norm 1 (paper appendix A).

A run is a pure function of its :class:`~rgkern.tools.presets.TrainConfig` (and the device's
arithmetic), so it resumes bit-identically; :mod:`rgkern.tools.trainer` (the
:class:`~rgkern.tools.trainer.Trainer`) says how. The held-out bits/dim and the MSDS quality
score recorded at every evaluation are in :mod:`rgkern.tools.evaluation`.

Failure handling: a NaN or infinite loss or gradient norm (the run diverged) stops training
with :class:`~rgkern.tools.trainer.DivergenceError` naming the step; the update is not applied
and nothing is written, so the last good checkpoint stays. Resuming with a different model config raises
:class:`rgkern.tools.checkpoint.CheckpointError`; with different training settings, ``ValueError``.
An output folder that cannot be written raises ``PermissionError`` before any work starts; a
disk that fills up while a checkpoint is written raises ``OSError`` naming the file, and the
previous checkpoint stays intact (:func:`rgkern.tools.checkpoint.save_checkpoint` writes atomically).

Speed and scale
---------------
* Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N -m rgkern train ...`` trains
  with DistributedDataParallel; ``batch_size`` stays the global batch and the run equals the
  single-process run up to float rounding (:mod:`rgkern.tools.distributed` says how).
* ``bf16``: bfloat16 autocast around the model (:meth:`Trainer.loss <rgkern.tools.trainer.Trainer.loss>`).
* ``dtype="float64"``: the model's parameters, the preprocessed data, the loss and the
  held-out evaluation are float64 (the model is initialised in float32 as usual, then cast,
  so it starts from the same weights as the float32 run).
* ``compile``: the model's ``log_prob`` goes through ``torch.compile(fullgraph=True)``
  (:func:`rgkern.tools.compile.compile_function`); ``cuda_graphs`` (CUDA only) uses ``mode="reduce-overhead"``,
  which also captures the compiled forward and backward in CUDA graphs. Both keep the data
  order and noise, so a run with them follows the eager run to float rounding; resuming
  with them switched on or off is allowed.
* The trainer sets ``model.check_inputs = False`` while it trains (its inputs come from
  uint8 images through :func:`rgkern.preprocess` and are finite by construction), which
  removes the input-finite check's host synchronisation from every step; :func:`train`
  restores it.

The run folder's file names (:data:`CHECKPOINT_NAME`, :data:`HISTORY_NAME`) and
:func:`check_output_folder` are re-exported here from :mod:`rgkern.tools.trainer`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import InputError, InputFileExistsError, InputFileNotFoundError, InputTypeError
from ..core.model import RGFlow
from . import distributed as dist_utils
from .checkpoint import repair_sidecar
from .files import describe_holder, remove_orphans, run_lock
from .presets import PRESETS, TrainConfig
from .trainer import CHECKPOINT_NAME, HISTORY_NAME, Trainer, _quiet, _torch_dtype, check_output_folder

__all__ = [
    "train",
    "TrainResult",
    "load_images",
    "build_model",
    # the run folder's layout, from .trainer
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "check_output_folder",
]


def load_images(name: str, root: str | os.PathLike | None = None, split: str = "train", size: int | None = None, progress: bool = True) -> torch.Tensor:
    """uint8 ``(N, C, L, L)`` images of a dataset split (:func:`rgkern.data.load_dataset`)."""
    from ..data import load_dataset

    dataset = load_dataset(name, root=root, split=split, size=size, progress=progress)
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor):
        images = torch.stack([dataset[i] for i in range(len(dataset))])
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise InputError(f"dataset {name!r} gave images of dtype {images.dtype} and shape {tuple(images.shape)}, expected uint8 (N, C, L, L)")
    return images


def build_model(config: TrainConfig, image_size: int, channels: int) -> RGFlow:
    """The :class:`RGFlow` of ``config``, initialised from ``config.seed`` (global RNG untouched), in ``config.dtype``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = RGFlow(image_size=image_size, channels=channels, **config.model)
    return model.to(_torch_dtype(config.dtype))


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: RGFlow
    history: list
    test_bpd: float
    checkpoint: Path
    config: TrainConfig
    seconds: float


def train(
    config: TrainConfig,
    out: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], object] = print,
    time_limit: float | None = None,
) -> TrainResult:
    """Load the data, build the model and train it as ``config`` says, writing into ``out``.

    ``out`` gets ``model.safetensors`` (+ ``model.json``) and ``history.json``. A folder that
    already holds a checkpoint is refused unless ``resume`` (continue it, bit-identically)
    or ``overwrite`` (start again; the old checkpoint and history are removed first).
    ``time_limit``: stop after that many seconds of training (see :meth:`Trainer.fit`).

    Under ``torchrun`` (see :mod:`rgkern.tools.distributed`) this starts the process group (and
    ends it before returning), trains with DDP, and returns rank 0's history on every
    process; only rank 0 logs and writes.
    """
    start = time.time()
    if not isinstance(config, TrainConfig):
        raise InputTypeError(f"config must be a TrainConfig (see make_config), got {type(config).__name__}")
    if time_limit is not None and (
        isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0 or not math.isfinite(time_limit)
    ):
        raise InputError(f"time_limit must be a positive number of seconds or None, got {time_limit!r}")
    context, device, started = dist_utils.init_distributed(config.device)
    try:
        return _train(config, out, resume, overwrite, progress, log, time_limit, context, device, start)
    finally:
        if started:
            dist_utils.shutdown_distributed()


def _train(config, out, resume, overwrite, progress, log, time_limit, context, device, start) -> TrainResult:
    main = context.is_main
    if not main:
        log, progress = _quiet, False
    local_batch = dist_utils.check_global_batch_size(config.batch_size, context.world_size)
    if config.cuda_graphs and device.type != "cuda":
        raise InputError(f"cuda_graphs needs a CUDA device, got device {str(device)!r}; drop --cuda-graphs (--compile works on the CPU)")
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other")
    out = check_output_folder(out)
    # Only rank 0 writes, so only it holds the folder's lock (run_lock is re-entrant: the
    # command line holds it too, around the pictures it writes afterwards).
    with run_lock(out) if main else contextlib.nullcontext() as lock:
        if main:
            _tidy_run_folder(out, lock, log)
        return _train_in_folder(config, out, resume, overwrite, progress, log, time_limit, context, start, local_batch)


def _tidy_run_folder(out: Path, lock, log) -> None:
    """What a run killed in ``out`` left: report its lock, remove its temporary files, fix ``model.json``."""
    if lock.stale:
        log(f"{str(out)!r}: the previous run there ({describe_holder(lock.stale)}) ended without releasing its lock; taking over")
    removed = remove_orphans(out, legacy=True)
    if removed:
        size = sum(size for _, size in removed)
        log(f"removed {len(removed)} temporary file(s) of an interrupted write ({size / 2**20:.1f} MiB): "
            + ", ".join(path.name for path, _ in removed))
    if repair_sidecar(out / CHECKPOINT_NAME):
        log(f"{str(out / 'model.json')!r} did not match {CHECKPOINT_NAME} (a write was interrupted); rewritten from it")


def _load_split(config, split: str, progress: bool) -> torch.Tensor:
    """The images of ``split``; a size larger than the data names the setting and where it came from."""
    from ..data.base import SizeTooLargeError

    key = "train_size" if split == "train" else "test_size"
    size = getattr(config, key)
    try:
        return load_images(config.data, config.data_root, split, size, progress)
    except SizeTooLargeError as error:
        preset = PRESETS.get(config.preset or "", {})
        source = f"the default of preset {config.preset!r}" if preset.get(key) == size else "as given"
        raise InputError(
            f"the {split} split of {config.data!r} has {error.available} images, but the run asks for {key}={size} "
            f"({source}); pass --{key.replace('_', '-')} {error.available} (or less), or more data"
        ) from None


def _train_in_folder(config, out, resume, overwrite, progress, log, time_limit, context, start, local_batch) -> TrainResult:
    main = context.is_main
    checkpoint = out / CHECKPOINT_NAME
    if resume and not checkpoint.exists():
        raise InputFileNotFoundError(f"cannot resume: {str(checkpoint)!r} does not exist")
    if checkpoint.exists() and not (resume or overwrite):
        raise InputFileExistsError(
            f"{str(out)!r} already holds a checkpoint; resume it (--resume), start over (--overwrite) or choose another folder"
        )
    preset = PRESETS.get(config.preset or "", {})
    if preset.get("description"):
        log(f"preset {config.preset!r}: {preset['description']}")
    # With a data cache folder, rank 0 fills the cache first and the others read it.
    ordered = context.enabled and config.data_root is not None
    if ordered and not main:
        dist_utils.barrier(context)
    train_images = _load_split(config, "train", progress)
    test_images = _load_split(config, "test", progress)
    if ordered and main:
        dist_utils.barrier(context)
    model = build_model(config, image_size=train_images.shape[-1], channels=train_images.shape[1])
    for temperature in config.sample_temperatures:  # a bad sample temperature fails now, not after training
        model.temperature_map(temperature, device="cpu")
    check_inputs = model.check_inputs
    trainer = Trainer(model, train_images, test_images, config, out, log=log, distributed=context)
    # --overwrite removes the old run only now, once the data, the model and the trainer's
    # settings are all checked: a refused command leaves the run as it was.
    dist_utils.barrier(context)  # every process has looked and checked before rank 0 removes anything
    if overwrite and main:
        for name in (CHECKPOINT_NAME, Path(CHECKPOINT_NAME).with_suffix(".json").name, HISTORY_NAME):
            (out / name).unlink(missing_ok=True)
    try:
        if resume:
            trainer.resume()
            log(f"resuming {checkpoint} at step {trainer.step} of {config.steps}")
        parameters = sum(p.numel() for p in model.parameters())
        switches = (
            ("float64", config.dtype == "float64"), ("random horizontal flips", config.hflip), ("bf16 autocast", config.bf16),
            ("torch.compile", config.compile or config.cuda_graphs), ("CUDA graphs", config.cuda_graphs),
        )
        options = [name for name, on in switches if on]
        if context.enabled:
            options.append(f"DDP over {context.world_size} processes ({local_batch} images each per step)")
        log(
            f"training {parameters:,} parameters on {len(train_images):,} {config.data} images "
            f"({len(test_images):,} held out), batch {config.batch_size}, {config.steps:,} steps, device {trainer.device}"
            + "".join(f", {option}" for option in options)
        )
        history = trainer.fit(progress=progress, time_limit=time_limit)
    finally:
        model.check_inputs = check_inputs
    return TrainResult(model=trainer.model, history=history, test_bpd=history[-1]["test_bpd"], checkpoint=trainer.checkpoint_path, config=config, seconds=time.time() - start)

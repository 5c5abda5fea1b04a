"""Maximum-likelihood training of RG-Flow, with checkpoints that resume bit-identically.

The loss is the mean negative log-likelihood of 8-bit images in bits per dimension
(:func:`rgkern.bits_per_dim`, which counts the preprocessing log-det), optimised with AdamW
(lr 1e-3, weight decay 5e-5) and gradient clipping at global norm 1 (paper appendix A).

Reproducibility and resume
--------------------------
A run is a pure function of its :class:`TrainConfig` (and the device's arithmetic):

* The model is initialised from ``torch.manual_seed(seed)`` (inside ``fork_rng``, so the
  caller's global RNG is left alone).
* The data order has no state: the batch of update ``s`` is slice ``s mod E`` of the
  permutation ``torch.randperm(n, generator=Generator().manual_seed(derived(seed, epoch)))``
  with ``epoch = s // E`` and ``E = n // batch_size`` updates per epoch (the last partial
  batch of an epoch is dropped). The step counter is the whole data-order state.
* Dequantisation noise comes from its own generator (on the training device), seeded from
  ``seed``; its state is saved in every checkpoint (``extra.noise_rng``), with the global
  torch RNG state (``extra.torch_rng``, and ``extra.cuda_rng`` on CUDA) for completeness.
* The held-out bits/dim uses a fixed dequantisation noise: a CPU generator re-seeded with
  :data:`EVAL_NOISE_SEED` at every evaluation, independent of the training seed. The figure
  is therefore deterministic, comparable between runs and evaluations, and still the usual
  variational estimate (uniform noise, not bin centres) that the paper's tables report.

So training ``2N`` steps, or ``N`` steps, then ``resume=True`` for ``N`` more, gives the same
weights bit for bit (on the same device). Checkpoints (``out/model.safetensors`` with its
``model.json``, via :func:`rgkern.checkpoint.save_checkpoint`) hold the model, the AdamW
state, the RNG states, the step and, in ``info``, the training config and the history;
``out/history.json`` holds the history alone.

Failure handling: a NaN or infinite loss or gradient norm stops training with
:class:`NonFiniteError` naming the step; the update is not applied and nothing is written,
so the last good checkpoint stays. Resuming with a different model config raises
:class:`rgkern.checkpoint.CheckpointError`; with different training settings, ``ValueError``.
An output folder that cannot be written raises ``PermissionError`` before any work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import _atomic_write, load_checkpoint, save_checkpoint
from .model import RGFlow
from .preprocess import bits_per_dim, preprocess

__all__ = [
    "PRESETS",
    "TrainConfig",
    "make_config",
    "preset_names",
    "Trainer",
    "TrainResult",
    "train",
    "evaluate_bpd",
    "batch_indices",
    "load_images",
    "build_model",
    "check_output_folder",
    "NonFiniteError",
    "EVAL_NOISE_SEED",
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
]

EVAL_NOISE_SEED = 20_200_101
CHECKPOINT_NAME = "model.safetensors"
HISTORY_NAME = "history.json"

# Settings that fix the trajectory of a run: resuming with any of them changed would not
# continue the same run, so it is refused.
_RESUME_KEYS = ("data", "train_size", "test_size", "batch_size", "lr", "weight_decay", "grad_clip", "seed", "bf16")

# RGFlow keyword arguments (image_size and channels come from the data) and training
# settings. "paper" is the paper's CelebA/CIFAR model (appendix A), "paper-msds" its MSDS
# model (appendix B: n_layer = 4, n_res = 4); both are GPU-sized. "cpu" is a small model that
# shows learning on MSDS1 in a few minutes on a 2-core CPU. "tiny" is for tests only.
PRESETS: dict[str, dict] = {
    "paper": dict(
        model=dict(kernel_size=4, n_layers=None, hidden=512, n_res=4, n_mlp=2, prior="laplace"),
        data="cifar10",
        train_size=None,
        test_size=None,
        batch_size=64,
        steps=390_000,  # about 500 epochs of the 50,000 CIFAR-10 training images
        eval_every=5_000,
        checkpoint_every=5_000,
        description="the paper's model (appendix A: n_layers (8, 6, 4, 2), hidden 512, n_res 4, n_mlp 2); needs a GPU",
    ),
    "paper-msds": dict(
        model=dict(kernel_size=4, n_layers=4, hidden=512, n_res=4, n_mlp=2, prior="laplace"),
        data="msds1",
        train_size=None,
        test_size=None,
        batch_size=64,
        steps=703_000,  # about 500 epochs of the 90,000 MSDS training images
        eval_every=5_000,
        checkpoint_every=5_000,
        description="the paper's MSDS model (appendix B: n_layers 4, hidden 512, n_res 4, n_mlp 2); needs a GPU",
    ),
    "cpu": dict(
        # Measured on a shared 2-core CPU (MSDS1, held-out bits/dim at step 300): lr 1e-3 5.95,
        # 3e-3 5.02, 1e-2 4.50; batch 32 learns as much per step as 64 at half the cost; hidden
        # 64 a little more than 32 (4.40 vs 4.50). So a higher lr than the paper's for this short run.
        model=dict(kernel_size=4, n_layers=2, hidden=64, n_res=1, n_mlp=1, prior="laplace"),
        data="msds1",
        train_size=4_000,
        test_size=500,
        batch_size=32,
        lr=1e-2,
        steps=1_000,
        eval_every=100,
        checkpoint_every=500,
        description=(
            "the small CPU preset (n_layers 2, hidden 64, n_res 1, n_mlp 1, lr 1e-2, batch 32) on 4,000 MSDS1 "
            "images; the paper-size model (--preset paper or paper-msds) needs a GPU"
        ),
    ),
    "tiny": dict(
        model=dict(kernel_size=4, n_layers=1, hidden=8, n_res=1, n_mlp=0, prior="laplace"),
        data="msds1",
        train_size=64,
        test_size=32,
        batch_size=16,
        lr=1e-2,
        steps=8,
        eval_every=4,
        checkpoint_every=4,
        description="a tiny model for tests",
        hidden=True,
    ),
}


def preset_names(include_hidden: bool = False) -> list[str]:
    """Names of the presets (without the test-only ones unless ``include_hidden``)."""
    return [name for name, preset in PRESETS.items() if include_hidden or not preset.get("hidden")]


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``model``: :class:`rgkern.RGFlow` keyword arguments except ``image_size`` and
    ``channels`` (taken from the data). ``data``/``data_root``: see
    :func:`rgkern.data.load_dataset`. ``train_size``/``test_size``: the first images of the
    train/test split (``None``: all). ``steps``: total optimiser updates. ``eval_every``:
    held-out bits/dim every so many steps (and at step 0 and the last step).
    ``checkpoint_every``: checkpoint every so many steps (and at the last step).
    ``bf16``: bfloat16 autocast around the model (see :meth:`Trainer.loss`). ``device``:
    ``None`` picks CUDA when available, else the CPU. ``sample_temperature``: for the sample
    grid the CLI writes at the end (a float or one per RG level).
    """

    model: dict = field(default_factory=dict)
    preset: str | None = None
    data: str = "msds1"
    data_root: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-5
    grad_clip: float = 1.0
    steps: int = 1_000
    eval_every: int = 100
    checkpoint_every: int = 500
    eval_batch_size: int = 256
    seed: int = 0
    bf16: bool = False
    device: str | None = None
    sample_temperature: float | list = 1.0

    def __post_init__(self):
        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")

        for name in ("batch_size", "steps", "eval_every", "checkpoint_every", "eval_batch_size"):
            positive_int(name)
        for name in ("train_size", "test_size"):
            positive_int(name, allow_none=True)
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"lr and grad_clip must be > 0, got lr={self.lr!r}, grad_clip={self.grad_clip!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.model, dict):
            raise TypeError(f"model must be a dict of RGFlow keyword arguments, got {type(self.model).__name__}")
        for key in ("image_size", "channels"):
            if key in self.model:
                raise ValueError(f"model must not set {key!r}: it is taken from the data")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def make_config(preset: str = "cpu", **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a preset name, with keyword ``overrides`` (``None`` values ignored).

    ``model`` in ``overrides`` updates the preset's model dict key by key.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {preset_names()}")
    settings = copy.deepcopy(PRESETS[preset])
    settings.pop("description", None)
    settings.pop("hidden", None)
    model_overrides = overrides.pop("model", None) or {}
    settings["model"].update(model_overrides)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; expected some of {sorted(known)}")
    return TrainConfig(preset=preset, **settings)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stopped before the update."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------- helpers
def _derived_seed(seed: int, stream: int, index: int = 0) -> int:
    """A 63-bit seed for one random stream of a run (no collisions for small seeds/indices)."""
    return (seed * 1_000_003 + stream * 1_000_000_007 + index * 7_919) % (2**63)


_ORDER_STREAM, _NOISE_STREAM = 1, 2


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices ``(batch_size,)`` of the training images used by update ``step`` (0-based).

    A pure function of its arguments (see the module docstring): the data order needs no
    saved state to resume.
    """
    per_epoch = num_images // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_images} training images")
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(_derived_seed(seed, _ORDER_STREAM, epoch))
    return torch.randperm(num_images, generator=generator)[position * batch_size : (position + 1) * batch_size]


def load_images(name: str, root=None, split: str = "train", size: int | None = None, progress: bool = True) -> torch.Tensor:
    """uint8 ``(N, C, L, L)`` images of a dataset split (:func:`rgkern.data.load_dataset`)."""
    from .data import load_dataset

    dataset = load_dataset(name, root=root, split=split, size=size, progress=progress)
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor):
        images = torch.stack([dataset[i] for i in range(len(dataset))])
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"dataset {name!r} gave images of dtype {images.dtype} and shape {tuple(images.shape)}, expected uint8 (N, C, L, L)")
    return images


def build_model(config: TrainConfig, image_size: int, channels: int) -> RGFlow:
    """The :class:`RGFlow` of ``config``, initialised from ``config.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return RGFlow(image_size=image_size, channels=channels, **config.model)


def check_output_folder(out) -> Path:
    """Create ``out`` if needed and check that a file can be written there; returns it as a Path.

    Raises ``PermissionError`` naming the folder when it cannot be created or written.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise PermissionError(f"output folder {str(out)!r} is not writable ({reason}); choose another one") from None
    return out


def _write_json(path: Path, document) -> None:
    text = json.dumps(document, indent=1) + "\n"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@torch.no_grad()
def evaluate_bpd(model, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> float:
    """Mean bits/dim of uint8 ``images (N, C, L, L)`` under ``model``, deterministically.

    The dequantisation noise is drawn on the CPU from a generator seeded with
    :data:`EVAL_NOISE_SEED` (the same noise at every call, whatever the device or batch
    size), then moved to the model's device. Runs in the model's dtype.
    """
    from tqdm.auto import tqdm

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty uint8 tensor (N, C, L, L)")
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    total = torch.zeros((), dtype=torch.float64, device=param.device)
    for start in tqdm(range(0, len(images), batch_size), desc="held-out bits/dim", leave=False, disable=not progress):
        y, logdet = preprocess(images[start : start + batch_size].cpu(), generator=generator)
        y, logdet = y.to(param.device, param.dtype), logdet.to(param.device)
        total += bits_per_dim(model.log_prob(y), logdet, model.num_dims).double().sum()
    return float(total) / len(images)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``model`` on uint8 images, writing checkpoints and history to ``out``.

    Args:
        model: an :class:`RGFlow` (moved to ``config.device``).
        train_images, test_images: uint8 ``(N, C, L, L)``; the test images give the held-out
            bits/dim.
        config: a :class:`TrainConfig` (``steps`` is the total to reach, also after a resume).
        out: output folder (checked for writing here).
        log: a function taking one line of text (default ``print``).

    Use :meth:`resume` to continue from ``out/model.safetensors``, then :meth:`fit`.
    """

    def __init__(self, model: RGFlow, train_images: torch.Tensor, test_images: torch.Tensor, config: TrainConfig, out, log=print):
        self.out = check_output_folder(out)
        self.config = config
        self.log = log
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        for name, images in (("train_images", train_images), ("test_images", test_images)):
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
                raise ValueError(f"{name} must be a non-empty uint8 tensor (N, C, L, L)")
            if images.shape[1:] != (model.channels, model.image_size, model.image_size):
                raise ValueError(
                    f"{name} have shape {tuple(images.shape[1:])} per image, the model expects "
                    f"({model.channels}, {model.image_size}, {model.image_size})"
                )
        if len(train_images) < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} is larger than the {len(train_images)} training images")
        self.model = model.to(self.device)
        self.train_images = train_images.to(self.device)
        self.test_images = test_images
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.noise_generator = torch.Generator(self.device).manual_seed(_derived_seed(config.seed, _NOISE_STREAM))
        self.step = 0
        self.history: list[dict] = []
        self._loss_sum = 0.0
        self._loss_count = 0

    # ----------------------------------------------------------------- files
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def history_path(self) -> Path:
        return self.out / HISTORY_NAME

    def save(self) -> Path:
        """Write the checkpoint and ``history.json`` (both atomically)."""
        extra = {"noise_rng": self.noise_generator.get_state(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        info = {
            "train_config": self.config.to_dict(),
            "history": self.history,
            "train_loss_sum": self._loss_sum,
            "train_loss_count": self._loss_count,
            "num_train_images": len(self.train_images),
            "num_test_images": len(self.test_images),
        }
        path = save_checkpoint(self.checkpoint_path, self.model, self.optimizer, step=self.step, info=info, extra_tensors=extra)
        _write_json(self.history_path, self.history)
        return path

    def resume(self) -> None:
        """Load model, optimiser, RNG states, step and history from ``out/model.safetensors``.

        Raises ``FileNotFoundError`` when there is no checkpoint, :class:`CheckpointError`
        when it holds a different model config, ``ValueError`` when its training settings
        differ from this run's in a way that changes the trajectory (``_RESUME_KEYS``).
        """
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"cannot resume: {str(self.checkpoint_path)!r} does not exist")
        state = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, map_location=self.device)
        saved = state["info"].get("train_config", {})
        mine = self.config.to_dict()
        changed = {k: (saved.get(k), mine.get(k)) for k in _RESUME_KEYS if saved.get(k) != mine.get(k)}
        if changed:
            raise ValueError(
                f"cannot resume {str(self.checkpoint_path)!r}: training settings differ from the checkpoint's "
                f"(checkpoint, now): {changed}; use the same settings or start a new run in another folder"
            )
        extra = state["extra_tensors"]
        self.noise_generator.set_state(extra["noise_rng"])
        torch.set_rng_state(extra["torch_rng"])
        if "cuda_rng" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
        self.step = state["step"]
        self.history = state["info"].get("history", [])
        self._loss_sum = state["info"].get("train_loss_sum", 0.0)
        self._loss_count = state["info"].get("train_loss_count", 0)

    # ----------------------------------------------------------------- steps
    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Mean bits/dim (a scalar with grad) of a uint8 batch on the training device.

        With ``config.bf16`` the model runs under ``torch.autocast(dtype=bfloat16)``: the
        matrix products of the s/t networks run in bfloat16, while the coupling update
        ``x * exp(s) + t`` promotes back to float32 (the rows are float32), and the log-dets,
        the prior and the loss stay float32. Autocast alone does not pin every coupling
        operation to float32; that is left to the kernels' own dtype handling.
        """
        y, logdet = preprocess(images, generator=self.noise_generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            log_prob = self.model.log_prob(y)
        return bits_per_dim(log_prob.float(), logdet, self.model.num_dims).mean()

    def train_step(self) -> float:
        """One AdamW update on the batch of ``self.step``; returns its training bits/dim.

        Raises :class:`NonFiniteError` (before the update, leaving model and optimiser as
        they were) when the loss or the gradient norm is not finite.
        """
        number = self.step + 1
        index = batch_indices(self.step, len(self.train_images), self.config.batch_size, self.config.seed)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.train_images[index.to(self.device)])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
        for what, value in (("loss", loss_value), ("gradient norm", norm_value)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                last = f"the last checkpoint ({self.checkpoint_path}) is unchanged" if self.checkpoint_path.exists() else "no checkpoint was written"
                raise NonFiniteError(
                    f"training stopped at step {number}: the {what} is {value}; the update was not applied "
                    f"and {last}. Try a lower learning rate, or resume from the checkpoint",
                    number,
                )
        self.optimizer.step()
        self.step = number
        self._loss_sum += loss_value
        self._loss_count += 1
        return loss_value

    def evaluate(self, progress: bool = False) -> float:
        """Held-out bits/dim on the test images (deterministic; see :func:`evaluate_bpd`)."""
        self.model.eval()
        return evaluate_bpd(self.model, self.test_images, self.config.eval_batch_size, progress=progress)

    def _record(self) -> dict:
        train_bpd = self._loss_sum / self._loss_count if self._loss_count else None
        entry = {"step": self.step, "train_bpd": train_bpd, "test_bpd": self.evaluate(), "time": round(time.time(), 1)}
        self.history.append(entry)
        self._loss_sum, self._loss_count = 0.0, 0
        return entry

    def fit(self, progress: bool = True) -> list[dict]:
        """Train until ``config.steps``; returns the history (list of ``{step, train_bpd, test_bpd, time}``)."""
        from tqdm.auto import tqdm

        config = self.config
        if self.step == 0 and not self.history:
            self._record()
        last_test = self.history[-1]["test_bpd"]
        with tqdm(total=config.steps, initial=self.step, desc="training", unit="step", disable=not progress, dynamic_ncols=True) as bar:
            while self.step < config.steps:
                loss = self.train_step()
                bar.update(1)
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    entry = self._record()
                    last_test = entry["test_bpd"]
                    message = f"step {self.step}: training {entry['train_bpd']:.4f}, held-out {last_test:.4f} bits/dim"
                    bar.write(message) if progress and self.log is print else self.log(message)
                bar.set_postfix(loss=f"{loss:.3f}", test_bpd=f"{last_test:.3f}", refresh=False)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
        if self.history[-1]["step"] != self.step:  # resumed at or past config.steps
            self._record()
            self.save()
        return self.history


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: RGFlow
    history: list
    test_bpd: float
    checkpoint: Path
    config: TrainConfig
    seconds: float


def train(config: TrainConfig, out, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> TrainResult:
    """Load the data, build the model and train it as ``config`` says, writing into ``out``.

    ``out`` gets ``model.safetensors`` (+ ``model.json``) and ``history.json``. A folder that
    already holds a checkpoint is refused unless ``resume`` (continue it, bit-identically)
    or ``overwrite`` (start again; the old checkpoint and history are removed first).
    """
    start = time.time()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (see make_config), got {type(config).__name__}")
    out = check_output_folder(out)
    checkpoint = out / CHECKPOINT_NAME
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if resume and not checkpoint.exists():
        raise FileNotFoundError(f"cannot resume: {str(checkpoint)!r} does not exist")
    if checkpoint.exists() and not (resume or overwrite):
        raise FileExistsError(
            f"{str(out)!r} already holds a checkpoint; resume it (--resume), start over (--overwrite) or choose another folder"
        )
    if overwrite:
        for name in (CHECKPOINT_NAME, Path(CHECKPOINT_NAME).with_suffix(".json").name, HISTORY_NAME):
            (out / name).unlink(missing_ok=True)
    preset = PRESETS.get(config.preset or "", {})
    if preset.get("description"):
        log(f"preset {config.preset!r}: {preset['description']}")
    train_images = load_images(config.data, config.data_root, "train", config.train_size, progress)
    test_images = load_images(config.data, config.data_root, "test", config.test_size, progress)
    model = build_model(config, image_size=train_images.shape[-1], channels=train_images.shape[1])
    model.temperature_map(config.sample_temperature, device="cpu")  # a bad sample temperature fails now, not after training
    trainer = Trainer(model, train_images, test_images, config, out, log=log)
    if resume:
        trainer.resume()
        log(f"resuming {checkpoint} at step {trainer.step} of {config.steps}")
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"training {parameters:,} parameters on {len(train_images):,} {config.data} images "
        f"({len(test_images):,} held out), batch {config.batch_size}, {config.steps:,} steps, device {trainer.device}"
        + (", bf16 autocast" if config.bf16 else "")
    )
    history = trainer.fit(progress=progress)
    return TrainResult(model=trainer.model, history=history, test_bpd=history[-1]["test_bpd"], checkpoint=trainer.checkpoint_path, config=config, seconds=time.time() - start)

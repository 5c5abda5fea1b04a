"""The :class:`Trainer`: AdamW updates, evaluations and checkpoints of one run, resumable bit-identically.

:func:`rgkern.tools.train.train` builds one from a :class:`~rgkern.tools.presets.TrainConfig`;
that module's docstring describes a run as a whole.

Reproducibility and resume
--------------------------
A run is a pure function of its config (and the device's arithmetic):

* The model is initialised from ``torch.manual_seed(seed)`` (inside ``fork_rng``, so the
  caller's global RNG is left alone; :func:`rgkern.tools.train.build_model`).
* The data order has no state: the batch of update ``s`` is slice ``s mod E`` of the
  permutation ``torch.randperm(n, generator=Generator().manual_seed(derived(seed, epoch)))``
  with ``epoch = s // E`` and ``E = n // batch_size`` updates per epoch (the last partial
  batch of an epoch is dropped): :func:`batch_indices`. The step counter is the whole
  data-order state.
* With ``hflip``, the images of update ``s`` that are flipped left-right are drawn from a
  generator seeded with ``derived(seed, s)`` (:func:`flip_mask`): no saved state either.
* Dequantisation noise comes from its own generator (on the training device), seeded from
  ``seed``; its state is saved in every checkpoint (``extra.noise_rng``), with the global
  torch RNG state (``extra.torch_rng``, and ``extra.cuda_rng`` on CUDA) for completeness.
* The held-out bits/dim and, on MSDS data, the samples' quality score use fixed seeds of
  their own (:mod:`rgkern.tools.evaluation`): history entries get ``"quality":
  {temperature label: score}`` (:func:`rgkern.tools.sampling.temperature_label`).

So training ``2N`` steps, or ``N`` steps, then ``resume=True`` for ``N`` more, gives the same
weights bit for bit (on the same device). Checkpoints (``out/model.safetensors`` with its
``model.json``, via :func:`rgkern.tools.checkpoint.save_checkpoint`) hold the model, the AdamW
state, the RNG states, the step and, in ``info``, the training config and the history;
``out/history.json`` holds the history alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..core.errors import InputError, InputFileNotFoundError, InputPermissionError
from ..core.model import RGFlow
from ..core.preprocess import bits_per_dim, preprocess
from . import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint
from .compile import compile_function
from .distributed import DistributedContext
from .evaluation import _quality_note, evaluate_bpd, quality_kind, sample_quality
from .files import atomic_write, create_temporary
from .presets import TrainConfig, learning_rate

__all__ = [
    "Trainer",
    "DivergenceError",
    "make_optimizer",
    "batch_indices",
    "flip_mask",
    "check_output_folder",
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
]

CHECKPOINT_NAME = "model.safetensors"
HISTORY_NAME = "history.json"

# Settings that fix the trajectory of a run: resuming with any of them changed would not
# continue the same run, so it is refused.
_RESUME_KEYS = ("data", "train_size", "test_size", "batch_size", "lr", "lr_schedule", "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "seed", "bf16", "hflip", "dtype")


class DivergenceError(RuntimeError):
    """Training diverged: the loss or the gradient norm of update ``step`` became NaN or infinite.

    Training stopped before that update. Not an :class:`~rgkern.core.errors.InputError`:
    the settings were valid, the run did not converge with them (a lower learning rate or
    stronger clipping may). The command line reports it as ``rgkern train: training
    diverged: ...`` with exit code :data:`rgkern.cli.DIVERGED_EXIT_CODE`.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------- helpers
def _derived_seed(seed: int, stream: int, index: int = 0) -> int:
    """A 63-bit seed for one random stream of a run (no collisions for small seeds/indices)."""
    return (seed * 1_000_003 + stream * 1_000_000_007 + index * 7_919) % (2**63)


_ORDER_STREAM, _NOISE_STREAM, _FLIP_STREAM = 1, 2, 3


def batch_indices(step: int, num_images: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices ``(batch_size,)`` of the training images used by update ``step`` (0-based).

    A pure function of its arguments (see the module docstring): the data order needs no
    saved state to resume.
    """
    per_epoch = num_images // batch_size
    if per_epoch == 0:
        raise InputError(f"batch_size {batch_size} is larger than the {num_images} training images")
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(_derived_seed(seed, _ORDER_STREAM, epoch))
    return torch.randperm(num_images, generator=generator)[position * batch_size : (position + 1) * batch_size]


def flip_mask(step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Bool ``(batch_size,)`` (CPU): which images of update ``step``'s batch are flipped left-right.

    Each is True with probability 1/2, independently; a pure function of its arguments, like
    :func:`batch_indices`, so a resumed run flips the same images.
    """
    generator = torch.Generator().manual_seed(_derived_seed(seed, _FLIP_STREAM, step))
    return torch.rand(batch_size, generator=generator) < 0.5


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def check_output_folder(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check that a file can be written there; returns it as a Path.

    Raises ``PermissionError`` naming the folder when it cannot be created or written (also
    when it, or a folder above it, is a file).
    """
    out = Path(out)
    for place in (out, *out.parents):
        if place.exists() and not place.is_dir():
            what = "is a file" if place == out else f"is inside {str(place)!r}, which is a file"
            raise InputPermissionError(f"output folder {str(out)!r} is not writable: it {what}; choose another one")
        if place.exists():
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.unlink(create_temporary(out / ".write-test", suffix=".probe"))
    except OSError as error:
        reason = error.strerror or str(error)
        raise InputPermissionError(f"output folder {str(out)!r} is not writable ({reason}); choose another one") from None
    return out


def _write_json(path: Path, document) -> None:
    text = json.dumps(document, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class _LogProb(torch.nn.Module):
    """``forward(y) = fn(y)``, ``fn`` being ``model.log_prob`` or its compiled version.

    Holds the model as a submodule, so DistributedDataParallel can wrap it (DDP only
    synchronises gradients through a module's ``forward``); the model's ``state_dict``
    is unaffected.
    """

    def __init__(self, model: RGFlow, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y)


def _quiet(_line) -> None:
    pass


def make_optimizer(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the installed torch has one for these parameters, else foreach.

    The fused and foreach versions compute the same update to float rounding; the fused one
    is a few kernels per step instead of several per parameter group and step.
    """
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused AdamW for this device or dtype in this torch
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, foreach=True)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``model`` on uint8 images, writing checkpoints and history to ``out``.

    Args:
        model: an :class:`RGFlow` (moved to ``config.device``; ``model.check_inputs`` is set
            to False, see the module docstring).
        train_images, test_images: uint8 ``(N, C, L, L)``; the test images give the held-out
            bits/dim.
        config: a :class:`TrainConfig` (``steps`` is the total to reach, also after a resume).
        out: output folder (checked for writing here).
        log: a function taking one line of text (default ``print``; silenced on ranks > 0).
        distributed: a :class:`rgkern.tools.distributed.DistributedContext`; default: that of the
            initialised process group (:func:`rgkern.tools.distributed.current_context`), a single
            process without one. With more than one process the model is wrapped in
            DistributedDataParallel, every process trains on its shard of each global batch,
            and rank 0 alone evaluates and writes.

    Use :meth:`resume` to continue from ``out/model.safetensors``, then :meth:`fit`.
    """

    def __init__(
        self,
        model: RGFlow,
        train_images: torch.Tensor,
        test_images: torch.Tensor,
        config: TrainConfig,
        out: str | os.PathLike,
        log: Callable[[str], object] = print,
        distributed: DistributedContext | None = None,
    ) -> None:
        self.distributed = dist_utils.current_context() if distributed is None else distributed
        self.out = check_output_folder(out)
        self.config = config
        self.log = log if self.distributed.is_main else _quiet
        self.device = dist_utils.resolve_device(config.device, self.distributed)
        self.local_batch_size = dist_utils.check_global_batch_size(config.batch_size, self.distributed.world_size)
        if config.cuda_graphs and self.device.type != "cuda":
            raise InputError(
                f"cuda_graphs needs a CUDA device, got device {str(self.device)!r}; drop --cuda-graphs (--compile works on the CPU)"
            )
        for name, images in (("train_images", train_images), ("test_images", test_images)):
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
                raise InputError(f"{name} must be a non-empty uint8 tensor (N, C, L, L)")
            if images.shape[1:] != (model.channels, model.image_size, model.image_size):
                raise InputError(
                    f"{name} have shape {tuple(images.shape[1:])} per image, the model expects "
                    f"({model.channels}, {model.image_size}, {model.image_size})"
                )
        if len(train_images) < config.batch_size:
            raise InputError(f"batch_size {config.batch_size} is larger than the {len(train_images)} training images")
        if sum(p.numel() for p in model.parameters() if p.requires_grad) == 0:
            raise InputError(
                f"the model has no weights to train: n_layers is {model.config.get('n_layers')!r}, and a sublayer of 0 "
                "blocks is the identity; give at least one level 1 or more blocks"
            )
        self.dtype = _torch_dtype(config.dtype)
        self.model = model.to(self.device, self.dtype)
        # Inputs come from uint8 images through preprocess: finite by construction. Skipping
        # the model's check removes its host synchronisation from every step.
        self.model.check_inputs = False
        self.model.activation_checkpointing = config.activation_checkpointing
        self.train_images = train_images.to(self.device)
        self.test_images = test_images
        self.optimizer = make_optimizer(self.model.parameters(), config.lr, config.weight_decay)
        self.noise_generator = torch.Generator(self.device).manual_seed(_derived_seed(config.seed, _NOISE_STREAM))
        log_prob = self.model.log_prob
        if config.compile or config.cuda_graphs:
            log_prob = compile_function(log_prob, self.device, cuda_graphs=config.cuda_graphs)
        self._log_prob: torch.nn.Module = _LogProb(self.model, log_prob)
        if self.distributed.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._log_prob = DistributedDataParallel(self._log_prob, device_ids=device_ids)
        self.quality_kind = quality_kind(config.data, test_images.shape[1:])
        self.step = 0
        self.history: list[dict] = []
        self.stop_agreed = False
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
        """Write the checkpoint and ``history.json`` (both atomically). Under DDP only rank 0 calls it."""
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
            "world_size": self.distributed.world_size,
        }
        path = save_checkpoint(self.checkpoint_path, self.model, self.optimizer, step=self.step, info=info, extra_tensors=extra)
        _write_json(self.history_path, self.history)
        return path

    def resume(self) -> None:
        """Load model, optimiser, RNG states, step and history from ``out/model.safetensors``.

        Raises ``FileNotFoundError`` when there is no checkpoint, :class:`CheckpointError`
        when it holds a different model config, ``ValueError`` when its training settings
        differ from this run's in a way that changes the trajectory (``_RESUME_KEYS``).
        Under DDP every process loads the same file (the world size may differ from the
        run that wrote it: the global batch is what counts).
        """
        if not self.checkpoint_path.exists():
            raise InputFileNotFoundError(f"cannot resume: {str(self.checkpoint_path)!r} does not exist")
        state = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, map_location=self.device)
        saved = state["info"].get("train_config", {})
        mine = self.config.to_dict()
        # A setting a checkpoint predates had its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        saved = {k: saved.get(k, defaults[k]) for k in _RESUME_KEYS}
        changed = {k: (saved[k], mine.get(k)) for k in _RESUME_KEYS if saved[k] != mine.get(k)}
        if changed:
            raise InputError(
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

        ``images`` is the global batch. Under DDP it is preprocessed whole, so the noise
        generator advances as in one process and every image gets the noise it would get
        there; this process then keeps its shard (rows ``rank::world_size``) and returns
        that shard's mean (DDP averages the gradients over the processes).

        With ``config.bf16`` the model runs under ``torch.autocast(dtype=bfloat16)``: the
        matrix products of the s/t networks run in bfloat16, while the coupling update
        ``x * exp(s) + t`` promotes back to float32 (the rows are float32), and the log-dets,
        the prior and the loss stay float32. Autocast alone does not pin every coupling
        operation to float32; that is left to the kernels' own dtype handling.
        With ``config.compile`` / ``cuda_graphs`` the model's ``log_prob`` is the compiled one.
        """
        y, logdet = preprocess(images, generator=self.noise_generator, dtype=self.dtype)
        y, logdet = dist_utils.shard(y, self.distributed), dist_utils.shard(logdet, self.distributed)
        if self.config.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training iteration for the CUDA graph trees
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            log_prob = self._log_prob(y)
        # float32 at least (a bf16 log_prob is promoted), float64 for a float64 model.
        log_prob = log_prob.to(torch.promote_types(log_prob.dtype, torch.float32))
        return bits_per_dim(log_prob, logdet, self.model.num_dims).mean()

    def train_step(self, request_stop: bool = False) -> float:
        """One AdamW update on the batch of ``self.step``; returns its training bits/dim.

        Under DDP the returned figure is the mean over all processes (the global batch's).
        ``request_stop``: this process asks to stop after this step (the time limit of
        :meth:`fit`); it travels with the loss in the same all-reduce, and
        ``self.stop_agreed`` says afterwards whether any process asked.

        Raises :class:`DivergenceError` (before the update, leaving model and optimiser as
        they were) when the loss or the gradient norm is not finite; under DDP all processes
        see the same figures and stop together.
        """
        number = self.step + 1
        index = batch_indices(self.step, len(self.train_images), self.config.batch_size, self.config.seed)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        images = self.train_images[index.to(self.device)]
        if self.config.hflip:
            flip = flip_mask(self.step, len(images), self.config.seed).to(self.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        loss = self.loss(images)
        loss.backward()
        # grad_clip 0: no clipping; the norm is still computed (an infinite bound scales by 1).
        max_norm = self.config.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        figure_dtype = torch.promote_types(loss.dtype, torch.float32)  # float64 figures for a float64 run
        figures = torch.stack([loss.detach().to(figure_dtype), grad_norm.to(loss.device, figure_dtype), loss.new_tensor(float(request_stop), dtype=figure_dtype)])
        loss_value, norm_value, stop = dist_utils.all_reduce_mean(figures, self.distributed).tolist()
        self.stop_agreed = stop > 0
        for what, value in (("loss", loss_value), ("gradient norm", norm_value)):
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                last = f"the last checkpoint ({self.checkpoint_path}) is unchanged" if self.checkpoint_path.exists() else "no checkpoint was written"
                raise DivergenceError(
                    f"step {number}: the {what} is {value}; the update was not applied and {last}. "
                    "Resuming with the same settings repeats the same steps: start a new run with a lower "
                    "learning rate (--lr) or stronger gradient clipping (--clip-norm)",
                    number,
                )
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step)
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
        """Append a history entry; only rank 0 evaluates (the others record ``test_bpd`` None)."""
        train_bpd = self._loss_sum / self._loss_count if self._loss_count else None
        test_bpd = self.evaluate() if self.distributed.is_main else None
        entry = {"step": self.step, "train_bpd": train_bpd, "test_bpd": test_bpd, "time": round(time.time(), 1),
                 "lr": learning_rate(self.config, max(0, self.step - 1))}
        if self.quality_kind is not None and self.distributed.is_main:
            entry["quality"] = sample_quality(self.model, self.quality_kind, self.config.sample_temperatures)
        self.history.append(entry)
        self._loss_sum, self._loss_count = 0.0, 0
        return entry

    def fit(self, progress: bool = True, time_limit: float | None = None) -> list[dict]:
        """Train until ``config.steps``; returns the history (list of ``{step, train_bpd, test_bpd, time}``, and ``quality`` on MSDS data).

        ``time_limit``: seconds; when they have passed, training stops after the current
        step, evaluates and writes a checkpoint there (resume it later to go on). Under DDP,
        rank 0 evaluates and writes while the others wait at a barrier, and every process
        returns rank 0's history.
        """
        from tqdm.auto import tqdm

        config = self.config
        context = self.distributed
        main = context.is_main
        deadline = None if time_limit is None else time.monotonic() + time_limit
        if self.step == 0 and not self.history:
            self._record()
            dist_utils.barrier(context)
        last_test = self.history[-1]["test_bpd"]
        with tqdm(total=config.steps, initial=self.step, desc="training", unit="step", disable=not (progress and main), dynamic_ncols=True) as bar:
            while self.step < config.steps:
                out_of_time = main and deadline is not None and time.monotonic() >= deadline
                loss = self.train_step(request_stop=out_of_time)
                bar.update(1)
                evaluate_now = self.step % config.eval_every == 0 or self.step == config.steps
                checkpoint_now = self.step % config.checkpoint_every == 0 or self.step == config.steps
                if evaluate_now:
                    entry = self._record()
                    last_test = entry["test_bpd"]
                    if main:
                        message = f"step {self.step}: training {entry['train_bpd']:.4f}, held-out {last_test:.4f} bits/dim" + _quality_note(entry)
                        bar.write(message) if progress and self.log is print else self.log(message)
                if main:
                    bar.set_postfix(loss=f"{loss:.3f}", test_bpd=f"{last_test:.3f}", refresh=False)
                if checkpoint_now and main:
                    self.save()
                if evaluate_now or checkpoint_now:
                    dist_utils.barrier(context)
                if self.stop_agreed:
                    self.log(f"time limit of {time_limit:g} s reached at step {self.step} of {config.steps}: stopping here")
                    break
        if self.history[-1]["step"] != self.step:  # stopped by the time limit, or resumed at or past config.steps
            self._record()
            if main:
                self.save()
            dist_utils.barrier(context)
        self.history = dist_utils.broadcast_object(self.history, context)
        return self.history

"""Training presets and the configuration of a training run.

:data:`PRESETS` holds the named settings (``paper``, ``paper-msds``, ``cpu`` and the
test-only ``tiny``); :func:`make_config` turns a preset name plus overrides into a
:class:`TrainConfig`, which checks every value when it is made; :func:`resume_config` rebuilds
the config of a saved run. The trainer
(:mod:`rgkern.tools.train`) runs a config; a run is a pure function of it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import InputError, InputTypeError

__all__ = ["PRESETS", "DTYPES", "LR_SCHEDULES", "learning_rate", "DEFAULT_SAMPLE_TEMPERATURES", "MAX_SAMPLE_TEMPERATURES", "TrainConfig", "make_config", "resume_config", "preset_names"]

#: The parameter dtypes a run can train in (``TrainConfig.dtype``).
DTYPES = ("float32", "float64")
#: Learning-rate schedules (``TrainConfig.lr_schedule``): "constant"; "cosine" decay to 0 at
#: the last step; "wsd" (warm-up, stable, decay): constant, then a linear decay to 0 over the
#: last ``decay_steps`` updates. All after ``warmup_steps`` of linear warm-up.
LR_SCHEDULES = ("constant", "cosine", "wsd")
#: The default ``TrainConfig.sample_temperatures``: 1 and a lower one, as flow papers show samples.
DEFAULT_SAMPLE_TEMPERATURES = (1.0, 0.7)
#: At most this many sample temperatures (row groups of samples.png).
MAX_SAMPLE_TEMPERATURES = 8

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
        # Measured on a shared 2-core CPU, MSDS1, one thread, held-out bits/dim after 1,000 steps
        # (batch 32): n_layers 2 / hidden 64 / lr 1e-2: 3.61 (163 s); n_layers 2 / hidden 64 /
        # lr 2e-2: 3.54; n_layers 3 / hidden 48 / lr 2e-2: 3.39 (depth helps more than width).
        # Earlier: batch 32 learns as much per step as 64 at half the cost; lr 1e-3 is far too
        # slow here. 2026-12-05 (README, "What was tried"): a fourth block at levels 1-3, where
        # the ovals' shared colour is learned, and a cosine decay after 200 warm-up steps bring
        # the colour spread of samples at T = 0.7 from 54 to 48 and held-out bits/dim from
        # 2.84 to 2.73 in 4,000 steps (6 min 59 s of training).
        model=dict(kernel_size=4, n_layers=(3, 4, 4, 4), hidden=48, n_res=1, n_mlp=1, prior="laplace"),
        data="msds1",
        train_size=4_000,
        test_size=500,
        batch_size=32,
        lr=2e-2,
        lr_schedule="cosine",
        warmup_steps=200,
        steps=4_000,
        eval_every=250,
        checkpoint_every=1_000,
        description=(
            "the small CPU preset (n_layers 3,4,4,4, hidden 48, n_res 1, n_mlp 1, lr 2e-2 with cosine decay, batch 32, "
            "4,000 steps) on 4,000 MSDS1 images; the paper-size model (--preset paper or paper-msds) needs a GPU"
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
    ``grad_clip``: the global gradient norm to clip at; 0 turns clipping off (the authors'
    ``--clip_grad 0``). ``hflip``: flip each training image left-right with probability 1/2,
    drawn afresh for every batch (the paper does so for CelebA); the flips are a function of
    ``seed`` and the step, so a resumed run stays bit-identical. ``dtype``: ``"float32"`` or
    ``"float64"``, the dtype of the model's parameters and of the preprocessed data.
    ``lr_schedule``: one of :data:`LR_SCHEDULES`; ``warmup_steps``: updates of linear warm-up
    from ``lr / warmup_steps`` to ``lr``; ``decay_steps``: the length of the "wsd" schedule's
    final linear decay (0 for the other schedules). :func:`learning_rate` gives the rate of
    every update; both decays end at ``steps``, so a run resumed with more steps decays anew.
    ``bf16``: bfloat16 autocast around the model (see :meth:`Trainer.loss`). ``compile``:
    ``torch.compile`` the model's ``log_prob`` (fullgraph); ``cuda_graphs``: the same with
    ``mode="reduce-overhead"`` (CUDA graphs; CUDA only, implies ``compile``). ``batch_size``
    is the global batch under torchrun (split over the processes). ``device``:
    ``None`` picks CUDA when available, else the CPU. ``sample_temperatures``: the
    temperatures (each a float or one per RG level) of the sample grid the CLI writes at the
    end, one row group each, and of the MSDS quality score recorded at every evaluation
    (:mod:`rgkern.tools.quality`); one temperature is a list of one (``--sample-temperature T``
    gives ``[T]``). Runs saved by earlier versions may also hold a single
    ``sample_temperature`` (when not None it applied instead of the list);
    :func:`resume_config` reads it as that list of one.
    """

    model: dict = field(default_factory=dict)
    preset: str | None = None
    data: str = "msds1"
    data_root: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    weight_decay: float = 5e-5
    grad_clip: float = 1.0
    hflip: bool = False
    dtype: str = "float32"
    steps: int = 1_000
    eval_every: int = 100
    checkpoint_every: int = 500
    eval_batch_size: int = 256
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    activation_checkpointing: bool = False
    device: str | None = None
    sample_temperatures: list = field(default_factory=lambda: list(DEFAULT_SAMPLE_TEMPERATURES))

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")

        for name in ("batch_size", "steps", "eval_every", "checkpoint_every", "eval_batch_size"):
            positive_int(name)
        for name in ("train_size", "test_size"):
            positive_int(name, allow_none=True)
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InputError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if isinstance(self.decay_steps, bool) or not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            raise InputError(f"decay_steps must be an int >= 0, got {self.decay_steps!r}")
        if self.lr_schedule == "wsd" and not 0 < self.decay_steps <= self.steps - self.warmup_steps:
            raise InputError(
                f"lr_schedule 'wsd' needs 1 <= decay_steps <= steps - warmup_steps = {self.steps - self.warmup_steps}, "
                f"got decay_steps {self.decay_steps!r}"
            )
        if self.lr_schedule != "wsd" and self.decay_steps:
            raise InputError(f"decay_steps is the length of the 'wsd' schedule's decay; lr_schedule is {self.lr_schedule!r}, so it must be 0, got {self.decay_steps!r}")
        for name in ("bf16", "compile", "cuda_graphs", "activation_checkpointing", "hflip"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.bf16 and self.dtype != "float32":
            raise InputError(f"bf16 autocast is for float32 models, got dtype {self.dtype!r}; drop one of them")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.model, dict):
            raise InputTypeError(f"model must be a dict of RGFlow keyword arguments, got {type(self.model).__name__}")
        for key in ("image_size", "channels"):
            if key in self.model:
                raise InputError(f"model must not set {key!r}: it is taken from the data")
        temperatures = self.sample_temperatures
        if not isinstance(temperatures, (list, tuple)) or not 1 <= len(temperatures) <= MAX_SAMPLE_TEMPERATURES:
            raise InputError(
                f"sample_temperatures must be a list of 1 to {MAX_SAMPLE_TEMPERATURES} temperatures "
                f"(each a float or one per RG level), got {temperatures!r}"
            )
        self.sample_temperatures = list(temperatures)

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (as saved in checkpoints; :func:`resume_config` reads it back)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of update ``step`` (0-based) of a run with ``config``.

    Linear warm-up over the first ``warmup_steps`` updates (``lr * (step + 1) / warmup_steps``),
    then ``lr`` ("constant"); or ``lr * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 at the
    end of the warm-up to ``1 - 1 / (steps - warmup_steps)`` at the last update ("cosine"); or
    ``lr`` until the last ``decay_steps`` updates and ``lr * (steps - step) / decay_steps`` in
    them, from ``lr`` down to ``lr / decay_steps`` at the last update ("wsd").
    A pure function of its arguments, so a resumed run follows the same schedule.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "wsd":
        return config.lr * min(1.0, (config.steps - step) / config.decay_steps)
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_config(preset: str = "cpu", **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a preset name, with keyword ``overrides`` (``None`` values ignored).

    ``model`` in ``overrides`` updates the preset's model dict key by key.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; expected one of {preset_names()}")
    settings = copy.deepcopy(PRESETS[preset])
    settings.pop("description", None)
    settings.pop("hidden", None)
    model_overrides = overrides.pop("model", None) or {}
    settings["model"].update(model_overrides)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown training settings {unknown}; expected some of {sorted(known)}")
    return TrainConfig(preset=preset, **settings)


# The single sample temperature of runs saved before TrainConfig.sample_temperatures existed,
# later an override of that list; when not None it was the one temperature that applied.
_SAVED_SINGLE_TEMPERATURE = "sample_temperature"

# Settings a resumed run takes from the caller rather than from the run it continues: they
# do not change its trajectory, and may differ from one session (or machine) to the next.
_SESSION_SETTINGS = ("device", "compile", "cuda_graphs", "activation_checkpointing")


def resume_config(saved: dict, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a saved run (``saved``: its :meth:`TrainConfig.to_dict`), with ``overrides``.

    Settings ``saved`` lacks (a run written before they existed) take their defaults, and
    so do ``device``, ``compile``, ``cuda_graphs`` and ``activation_checkpointing``, which
    belong to the session rather than the run. A saved single ``sample_temperature`` (older
    runs) becomes ``sample_temperatures=[it]``. ``overrides`` as in :func:`make_config`
    (``None`` values ignored; ``model`` updates the saved model dict key by key).
    """
    if not isinstance(saved, dict):
        raise InputTypeError(f"saved must be a dict (TrainConfig.to_dict()), got {type(saved).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: copy.deepcopy(v) for k, v in saved.items() if k in known and k not in _SESSION_SETTINGS}
    settings["model"] = {**settings.get("model", {}), **(overrides.pop("model", None) or {})}
    if saved.get(_SAVED_SINGLE_TEMPERATURE) is not None:  # it applied instead of the saved list
        settings["sample_temperatures"] = [copy.deepcopy(saved[_SAVED_SINGLE_TEMPERATURE])]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"unknown training settings {unknown}; expected some of {sorted(known)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings)

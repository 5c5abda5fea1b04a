"""Checkpoints: one safetensors file with the model, optimiser state and a JSON config.

A checkpoint ``run/model.safetensors`` holds:

* the model weights under ``model.<name>``;
* optimiser tensors (Adam moments, step counts) under ``optim.<param index>.<name>`` and any
  extra tensors (e.g. RNG states) under ``extra.<name>``;
* in its safetensors metadata, a JSON document ``rgkern`` with the model config, the training
  step, the optimiser's non-tensor state (param groups) and user ``info``.

A human-readable copy of that JSON is written beside it (``run/model.json``); loading reads
only the safetensors file. Both files are written atomically (temporary file, then rename),
so a run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import InputError, InputFileNotFoundError
from .files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "read_document", "CheckpointError"]

#: 2: the stacked s/t parameter layout (``sublayers.S.networks.*``); 1: one ``nn.Linear`` per
#: layer (``sublayers.S.blocks.B.halves.H.*``), converted on load.
FORMAT_VERSION = 2


class CheckpointError(InputError):
    """A checkpoint file that cannot be read or does not fit the model it is loaded into."""


def _json_sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(path, model, optimizer=None, step: int = 0, info: dict | None = None, extra_tensors=None) -> Path:
    """Write ``model`` (and optionally ``optimizer``) to ``path`` (a ``.safetensors`` file).

    Returns the path written. ``info`` must be JSON-serialisable; ``extra_tensors`` is a dict
    of tensors stored as they are (e.g. RNG states).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_groups = None
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, entries in state["state"].items():
            for name, value in entries.items():
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
        optim_groups = state["param_groups"]
    for name, value in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
    document = {
        "format": FORMAT_VERSION,
        "config": model.config,
        "step": int(step),
        "optimizer_param_groups": optim_groups,
        "info": info or {},
    }
    text = json.dumps(document, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"rgkern": text}))
    atomic_write(_json_sidecar(path), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def _read(path: Path, with_tensors: bool = True):
    from safetensors import safe_open

    if not path.exists():
        raise InputFileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
        document = json.loads(metadata["rgkern"])
        document["config"]
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an rgkern checkpoint ({type(error).__name__}: {error})"
        ) from error
    return document, tensors


def read_document(path) -> dict:
    """The JSON document of the checkpoint at ``path`` (``config``, ``step``, ``info``, ...), without reading its tensors."""
    return _read(Path(path), with_tensors=False)[0]


def _normalise(config: dict) -> dict:
    # Checkpoints written before the "authors" variant existed hold paper-variant models.
    config = {"variant": "paper", **config}
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


def load_checkpoint(path, model=None, optimizer=None, map_location="cpu") -> dict:
    """Load ``path`` into ``model`` (built from the stored config, in the stored dtype, when ``None``) and ``optimizer``.

    Returns a dict with ``model``, ``config``, ``step``, ``info`` and ``extra_tensors``.
    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (a
    ``ValueError``) for a corrupt file or one whose config differs from ``model``'s.
    """
    from ..core.model import RGFlow, convert_legacy_state_dict, is_legacy_state_dict

    path = Path(path)
    document, tensors = _read(path)
    config = document["config"]
    built = model is None
    if built:
        model = RGFlow(**config).to(map_location)
    elif _normalise(model.config) != _normalise(config):
        diff = {
            k: (config.get(k), model.config.get(k))
            for k in sorted(set(config) | set(model.config))
            if _normalise({k: config.get(k)}) != _normalise({k: model.config.get(k)})
        }
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from a different model config; "
            f"differences (checkpoint, model): {diff}"
        )
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if built:  # in the dtype it was saved in (a float64 run's model comes back float64)
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtypes.pop())
    legacy = is_legacy_state_dict(state)
    if legacy:
        if optimizer is not None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written with the first parameter layout (format 1); its weights "
                "load (load_model, evaluate, sample), but its optimiser state does not map onto the stacked "
                "layout: start a new run from its weights instead of resuming"
            )
        try:
            state = convert_legacy_state_dict(state, model)
        except KeyError as error:
            raise CheckpointError(f"checkpoint {str(path)!r} (format 1) lacks model tensor {error}") from None
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks model tensors {sorted(missing)[:5]}")
    model.load_state_dict(state)
    if optimizer is not None:
        groups = document.get("optimizer_param_groups")
        if groups is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no optimiser state")
        optim_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return {
        "model": model,
        "config": config,
        "step": document["step"],
        "info": document.get("info", {}),
        "extra_tensors": extra,
    }


def load_model(path, device="cpu", backend="auto"):
    """An :class:`rgkern.RGFlow` rebuilt from the checkpoint at ``path``, in eval mode."""
    result = load_checkpoint(path, map_location=device)
    from ..core.ops import check_backend

    model = result["model"].to(device)
    model.backend = check_backend(backend)
    return model.eval()

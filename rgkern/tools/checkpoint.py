"""Checkpoints: one safetensors file with the model, optimiser state, a JSON config and checksums.

A checkpoint ``run/model.safetensors`` holds:

* the model weights under ``model.<name>``;
* optimiser tensors (Adam moments, step counts) under ``optim.<param index>.<name>`` and any
  extra tensors (e.g. RNG states) under ``extra.<name>``;
* in its safetensors metadata, a JSON document ``rgkern`` with the model config, the training
  step, the optimiser's non-tensor state (param groups), user ``info`` and ``tensors_sha256``,
  and a JSON table ``rgkern.sha256``: for every tensor, the SHA-256 of its dtype, shape and
  bytes; ``tensors_sha256`` is the SHA-256 of that table.

Loading checks, before any weight reaches a model: that the file is a safetensors file with
an ``rgkern`` document of a format this version reads; every tensor's checksum (a flipped
byte anywhere in the tensor data, or a tensor added or removed, is refused naming the
tensors); that every floating-point model and optimiser tensor is finite; and that the
tensors fit the model (names and shapes), with a message listing the settings and tensors
that differ. Checkpoints written before the checksums (no ``rgkern.sha256``) load with the
other checks.

A human-readable copy of the ``rgkern`` document is written beside it (``run/model.json``);
loading reads only the safetensors file. Both files are written with
:func:`rgkern.tools.files.atomic_write_many`: both temporary files are complete on disk
before the first rename, the safetensors file is renamed first, so a run killed mid-write
leaves the previous checkpoint intact; a kill between the two renames leaves ``model.json``
one version behind, which its ``tensors_sha256`` shows and :func:`repair_sidecar` (run by
the trainer when it starts in the folder) fixes.

Pretrained models ship with the package as ``rgkern/pretrained/NAME.safetensors`` (model
weights only, in the same format) and are named ``"pretrained:NAME"`` wherever a checkpoint
path is taken (:func:`load_model`, :func:`load_checkpoint`, :func:`read_document`, the CLI's
``--checkpoint``); :func:`load_pretrained` loads one by name, :func:`pretrained_names` lists them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from ..core.errors import InputError, InputFileNotFoundError, InputTypeError
from .files import atomic_write_many

if TYPE_CHECKING:
    from ..core.model import RGFlow

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "repair_sidecar",
    "read_document",
    "tensor_checksum",
    "CheckpointError",
    "PRETRAINED_PREFIX",
    "pretrained_names",
    "pretrained_path",
    "resolve_checkpoint",
    "load_pretrained",
    "is_legacy_state_dict",
    "convert_legacy_state_dict",
]

#: 2: the stacked s/t parameter layout (``sublayers.S.networks.*``); 1: one ``nn.Linear`` per
#: layer (``sublayers.S.blocks.B.halves.H.*``), converted on load.
FORMAT_VERSION = 2
METADATA_KEY = "rgkern"
CHECKSUM_KEY = "rgkern.sha256"
# At most this many names in one message.
_SHOWN = 6


class CheckpointError(InputError):
    """A checkpoint file that cannot be read or does not fit the model it is loaded into."""


#: A checkpoint path ``"pretrained:NAME"`` names the shipped ``rgkern/pretrained/NAME.safetensors``.
PRETRAINED_PREFIX = "pretrained:"
_PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def pretrained_names() -> list[str]:
    """The names of the pretrained models shipped with the package, sorted (``"msds1-cpu"``, ...)."""
    return sorted(path.stem for path in _PRETRAINED_DIR.glob("*.safetensors"))


def pretrained_path(name: str) -> Path:
    """The file of the shipped pretrained model ``name`` (with or without the ``pretrained:`` prefix).

    Raises :class:`~rgkern.core.errors.InputError` listing the available names for an unknown one.
    """
    if not isinstance(name, str):
        raise InputTypeError(f"a pretrained model's name must be a str, got {type(name).__name__}")
    bare = name[len(PRETRAINED_PREFIX):] if name.startswith(PRETRAINED_PREFIX) else name
    names = pretrained_names()
    if bare not in names:
        raise InputError(
            f"unknown pretrained model {bare!r}; available: "
            + (", ".join(PRETRAINED_PREFIX + n for n in names) if names else "none (rgkern/pretrained/ holds no model)")
        )
    return _PRETRAINED_DIR / f"{bare}.safetensors"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` as a file path: ``"pretrained:NAME"`` becomes the shipped file (:func:`pretrained_path`), anything else ``Path(path)``."""
    if isinstance(path, str) and path.startswith(PRETRAINED_PREFIX):
        return pretrained_path(path)
    return Path(path)


def _json_sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _listing(names: Iterable[str], limit: int = _SHOWN) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a CPU tensor's dtype, shape and bytes, as stored in a checkpoint."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(data))
    return digest.hexdigest()


def _table_checksum(table: dict) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def _non_finite(tensors: dict, prefixes: tuple[str, ...] = ("model.", "optim.")) -> list[str]:
    """``["name (k of n values)", ...]`` for floating tensors under ``prefixes`` holding NaN or inf."""
    bad = []
    for name, value in tensors.items():
        if name.startswith(prefixes) and value.is_floating_point() and value.numel():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append(f"{name} ({count} of {value.numel()} values)")
    return bad


def save_checkpoint(path: str | os.PathLike, model: RGFlow, optimizer: torch.optim.Optimizer | None = None, step: int = 0,
                    info: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (and optionally ``optimizer``) to ``path`` (a ``.safetensors`` file).

    Returns the path written. ``info`` must be JSON-serialisable; ``extra_tensors`` is a dict
    of tensors stored as they are (e.g. RNG states). Raises :class:`CheckpointError`, writing
    nothing, when a model or optimiser tensor holds NaN or inf (such a file could not be
    loaded back). Files are created with the mode a plain ``open`` gives (``0666`` less the
    umask, as pictures).
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
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"not writing checkpoint {str(path)!r}: {len(bad)} tensors hold NaN or inf: {_listing(bad)}; "
            "the previous checkpoint (if any) is unchanged"
        )
    table = {name: tensor_checksum(value) for name, value in tensors.items()}
    document = {
        "format": FORMAT_VERSION,
        "config": model.config,
        "step": int(step),
        "optimizer_param_groups": optim_groups,
        "info": info or {},
        "tensors_sha256": _table_checksum(table),
    }
    text = json.dumps(document, indent=1, sort_keys=True)
    metadata = {METADATA_KEY: text, CHECKSUM_KEY: json.dumps(table, sort_keys=True)}
    atomic_write_many([
        (path, lambda tmp: save_file(tensors, tmp, metadata=metadata)),
        (_json_sidecar(path), lambda tmp: Path(tmp).write_text(text + "\n")),
    ])
    return path


def _open_metadata(path: Path, with_tensors: bool) -> tuple[dict, dict | None]:
    """``(metadata dict, tensors dict or None)`` of a safetensors file, or CheckpointError."""
    from safetensors import safe_open

    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file; give a model.safetensors file or the run folder holding one")
    if not path.exists():
        raise InputFileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    if size < 16:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a safetensors file: it has only {size} bytes")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        from ..core.errors import file_error

        raise file_error(error.errno, f"cannot read checkpoint {str(path)!r}: {error.strerror or error}") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else None
    except Exception as error:  # safetensors raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a safetensors file ({type(error).__name__}: {error})"
        ) from error
    return metadata, tensors


def _parse_document(path: Path, metadata: dict) -> dict:
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not an rgkern checkpoint: its metadata has no "
            f"{METADATA_KEY!r} entry (it has {sorted(metadata) or 'none'})"
        )
    try:
        document = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its {METADATA_KEY!r} metadata is not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not an rgkern checkpoint: its metadata holds no model config")
    version = document.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {version!r}; this version of rgkern reads formats 1 to "
            f"{FORMAT_VERSION}: update rgkern to load it"
        )
    if not isinstance(document.get("step", 0), int) or isinstance(document.get("step", 0), bool) or document.get("step", 0) < 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its step is {document.get('step')!r}, not an int >= 0")
    info = document.get("info", {})
    if not isinstance(info, dict) or not isinstance(info.get("train_config", {}), dict):
        what = "info" if not isinstance(info, dict) else "info.train_config"
        found = info if not isinstance(info, dict) else info["train_config"]
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: its {what} is a {type(found).__name__} ({str(found)[:60]!r}), not a mapping"
        )
    return document


def _verify(path: Path, metadata: dict, document: dict, tensors: dict) -> bool:
    """Check the tensors against the checksum table (if the file has one) and for NaN/inf.

    Returns whether checksums were verified (False for checkpoints written before them).
    """
    verified = False
    if CHECKSUM_KEY in metadata:
        try:
            table = json.loads(metadata[CHECKSUM_KEY])
        except ValueError:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its checksum table is not JSON") from None
        if not isinstance(table, dict) or document.get("tensors_sha256") != _table_checksum(table):
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its checksum table does not match its document")
        missing = sorted(set(table) - set(tensors))
        added = sorted(set(tensors) - set(table))
        changed = sorted(name for name in set(table) & set(tensors) if tensor_checksum(tensors[name]) != table[name])
        problems = []
        if changed:
            problems.append(f"{len(changed)} tensors whose bytes changed since they were written: {_listing(changed)}")
        if missing:
            problems.append(f"{len(missing)} tensors missing: {_listing(missing)}")
        if added:
            problems.append(f"{len(added)} tensors added: {_listing(added)}")
        if problems:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt (checksum mismatch): " + "; ".join(problems)
                + "; use an intact copy or retrain"
            )
        verified = True
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds non-finite weights (NaN or inf) in {len(bad)} tensors: {_listing(bad)}; "
            "it would give NaN bits/dim and black samples: use an earlier checkpoint"
        )
    return verified


def _read(path: Path) -> tuple[dict, dict]:
    metadata, tensors = _open_metadata(path, with_tensors=True)
    document = _parse_document(path, metadata)
    document["_verified"] = _verify(path, metadata, document, tensors)
    return document, tensors


def read_document(path: str | os.PathLike) -> dict:
    """The ``rgkern`` metadata document of checkpoint ``path`` (no tensor is read or checked)."""
    path = resolve_checkpoint(path)
    metadata, _ = _open_metadata(path, with_tensors=False)
    return _parse_document(path, metadata)


def repair_sidecar(path: str | os.PathLike) -> bool:
    """Rewrite ``model.json`` beside checkpoint ``path`` from the checkpoint when it differs.

    ``model.json`` is a copy of the checkpoint's ``rgkern`` document; a run killed between
    the two renames of :func:`save_checkpoint` leaves it one version behind (or missing).
    Returns True when it was rewritten; does nothing (False) when the copy is current or the
    checkpoint is missing or unreadable (loading it reports that).
    """
    path = Path(path)
    try:
        metadata, _ = _open_metadata(path, with_tensors=False)
        document = _parse_document(path, metadata)
    except (InputError, OSError):
        return False
    sidecar = _json_sidecar(path)
    try:
        current = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        current = None
    if current == document:
        return False
    text = json.dumps(document, indent=1, sort_keys=True)
    atomic_write_many([(sidecar, lambda tmp: Path(tmp).write_text(text + "\n"))])
    return True


def _normalise(config: dict) -> dict:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


def _with_defaults(config: dict) -> dict:
    """``config`` with settings it lacks (added to RGFlow after it was written) at their defaults."""
    from ..core.model import RGFlow

    full = dict(config)
    for name, parameter in inspect.signature(RGFlow.__init__).parameters.items():
        if name in ("self", "backend", "activation_checkpointing") or name in full:
            continue
        if isinstance(parameter.default, (str, bool, int, float)):
            full[name] = parameter.default
    return full


#: Weights a checkpoint's config may name beyond twice those its file holds (see _check_config_size).
ALLOCATION_SLACK = 2**20
#: The largest image size a checkpoint's config may name: the geometry's index tables grow with
#: ``L**2`` and are built with the model (the paper's models are 32 and 64).
MAX_CHECKPOINT_IMAGE_SIZE = 1024


def _check_config_size(path: Path, config: dict, state: dict) -> None:
    """Refuse, before anything is built, a config whose model does not hold the file's weights.

    A small file whose document names a huge model (hidden 4,194,304, image_size 2**18, ...)
    would otherwise allocate that model before any tensor shape is compared.
    """
    from ..core.model import weight_count

    image_size = config.get("image_size")
    if isinstance(image_size, int) and image_size > MAX_CHECKPOINT_IMAGE_SIZE:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has image_size {image_size}, above the {MAX_CHECKPOINT_IMAGE_SIZE} rgkern loads "
            "(its index tables alone would take gigabytes)"
        )
    if is_legacy_state_dict(state):
        return  # format 1: another layout, checked tensor by tensor when converted
    try:
        expected = weight_count(config)
    except (InputError, TypeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model config ({error})") from None
    held = sum(tensor.numel() for tensor in state.values())
    # Building the model to compare shapes (the detailed message) costs its weights: allowed up
    # to a small multiple of what the file holds, refused beyond, so that a document cannot make
    # rgkern allocate far more than the file it came in.
    if expected > 2 * held + ALLOCATION_SLACK:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its model config names a model of {expected:,} weights, but the file holds "
            f"{held:,}; the config and the tensors disagree (a damaged or edited document), so no model is built"
        )


def _build_model(path: Path, config: dict) -> RGFlow:
    from ..core.model import RGFlow

    try:
        return RGFlow(**config)
    except TypeError as error:  # settings this version does not know
        raise CheckpointError(f"checkpoint {str(path)!r} has a model config this version of rgkern cannot build ({error}): {config}") from None
    except InputError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model config ({error})") from None


def _shape_differences(expected: dict, found: dict) -> list:
    """Human-readable differences between two ``{name: shape}`` dicts (checkpoint = ``found``)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    parts = []
    if reshaped:
        shown = [f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})" for k in reshaped]
        parts.append(f"{len(reshaped)} tensors of other shapes: {_listing(shown, 3)}")
    if missing:
        parts.append(f"{len(missing)} model tensors missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors the model does not have: {_listing(unexpected)}")
    return parts


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that can hold tensors here, or InputError naming it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "meta":
        raise InputError("device 'meta' holds no data; weights cannot be loaded onto it (use 'cpu' or 'cuda')")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but CUDA is not available on this machine; use 'cpu'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"device {str(device)!r} cannot be used on this machine ({first}); use 'cpu' or 'cuda'") from None
    return device


def load_checkpoint(path: str | os.PathLike, model: RGFlow | None = None, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Load ``path`` into ``model`` (built from the stored config, in the stored dtype, when ``None``) and ``optimizer``.

    Returns a dict with ``model``, ``config``, ``step``, ``info``, ``extra_tensors`` and
    ``verified`` (whether the file carried checksums, all of which matched). Raises
    ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (a ``ValueError``)
    for a corrupt file (checksum mismatch included), non-finite weights, or one whose config
    or tensors differ from ``model``'s (the message lists the settings and tensors that
    differ); ``ValueError`` for a ``map_location`` this machine cannot use.
    """
    path = resolve_checkpoint(path)
    map_location = _check_device(map_location)
    document, tensors = _read(path)
    config = document["config"]
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    built = model is None
    if built:
        _check_config_size(path, config, state)
        model = _build_model(path, config).to(map_location)
        # In the dtype it was saved in: a float64 run's model comes back float64.
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtypes.pop())
    elif _normalise(_with_defaults(model.config)) != _normalise(_with_defaults(config)):
        mine, theirs = _with_defaults(model.config), _with_defaults(config)
        diff = {
            k: (theirs.get(k), mine.get(k))
            for k in sorted(set(theirs) | set(mine))
            if _normalise({k: theirs.get(k)}) != _normalise({k: mine.get(k)})
        }
        shapes = [] if is_legacy_state_dict(state) else _shape_differences(
            {k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state.items()}
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from a different model config; "
            f"differences (checkpoint, model): {diff}" + "".join(f"; {part}" for part in shapes)
        )
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
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {str(path)!r} (format 1) does not fit its own config ({str(error).splitlines()[0]})") from None
    differences = _shape_differences(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state.items()}
    )
    if differences:
        whose = "the model its own config describes (a damaged or foreign file)" if built else "this model"
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {whose}: " + "; ".join(differences))
    model.load_state_dict(state)
    if optimizer is not None:
        _load_optimizer(path, optimizer, document, tensors)
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return {
        "model": model,
        "config": config,
        "step": document["step"],
        "info": document.get("info", {}),
        "extra_tensors": extra,
        "verified": document["_verified"],
    }


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer, document: dict, tensors: dict) -> None:
    groups = document.get("optimizer_param_groups")
    if groups is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no optimiser state")
    optim_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            try:
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
            except ValueError:
                raise CheckpointError(f"checkpoint {str(path)!r} has a malformed optimiser tensor name {key!r}") from None
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    reshaped = [
        f"optim.{index}.{name} (checkpoint {tuple(value.shape)}, parameter {tuple(parameters[index].shape)})"
        for index, entries in optim_state.items()
        if index < len(parameters)
        for name, value in entries.items()
        if value.dim() > 0 and tuple(value.shape) != tuple(parameters[index].shape)
    ]
    if reshaped or any(index >= len(parameters) for index in optim_state):
        extra = sorted(index for index in optim_state if index >= len(parameters))
        detail = _listing(reshaped, 3) if reshaped else f"state for parameters {extra[:_SHOWN]} of {len(parameters)}"
        raise CheckpointError(f"checkpoint {str(path)!r}: its optimiser state does not fit this model's parameters: {detail}")
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: its optimiser state does not fit this optimiser ({error})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto") -> RGFlow:
    """An :class:`rgkern.RGFlow` rebuilt from the checkpoint at ``path`` (or ``"pretrained:NAME"``), in eval mode.

    ``backend="triton"`` on a device other than CUDA (without ``TRITON_INTERPRET=1``) is
    refused here with ``ValueError``, before the weights are read.
    """
    from ..core.ops import check_backend, require_triton

    backend = check_backend(backend)
    device = _check_device(device)
    path = resolve_checkpoint(path)
    if backend == "triton":
        require_triton(device, "backend 'triton'")
    result = load_checkpoint(path, map_location=device)
    model = result["model"].to(device)
    model.backend = backend
    return model.eval()


def load_pretrained(name: str, device: str | torch.device = "cpu", backend: str = "auto") -> RGFlow:
    """The shipped pretrained model ``name`` (e.g. ``"msds1-cpu"``; see :func:`pretrained_names`), as :func:`load_model` gives it."""
    return load_model(pretrained_path(name), device=device, backend=backend)


# --------------------------------------------------------------------------- legacy checkpoints (format 1)
def _legacy_key(sublayer: int, pair: int, name: str) -> str:
    block, half = divmod(pair, 2)
    return f"sublayers.{sublayer}.blocks.{block}.halves.{half}.{name}"


def is_legacy_state_dict(state: dict) -> bool:
    """True for a state dict of the first layout (one ``nn.Linear`` per layer, ``blocks.B.halves.H``)."""
    return any(".halves." in key for key in state)


def convert_legacy_state_dict(state: dict[str, torch.Tensor], model: RGFlow) -> dict[str, torch.Tensor]:
    """Map a state dict of the first layout (checkpoint format 1) onto ``model``'s stacked layout.

    The first layout had, per half-step ``h`` of block ``b`` of sublayer ``s``,
    ``sublayers.s.blocks.b.halves.h.{s_net,t_net}.blocks.r.{2j}.beta`` (Swish slopes),
    ``....{2j+1}.parametrizations.weight.original0`` / ``original1`` (weight-norm ``g`` /
    ``v``), ``....{2j+1}.bias`` and ``...halves.h.{s_scale,t_scale}``. Half-step ``h`` of
    block ``b`` is pair ``2b + h`` here. Raises ``KeyError`` naming a missing tensor.
    """
    out = {}
    for s, sublayer in enumerate(model.sublayers):
        nets = sublayer.networks
        prefix = f"sublayers.{s}.networks"
        for j in range(nets.n_mlp + 1):
            parts = {
                "slopes": (f"{2 * j}.beta", lambda t: t.reshape(1, -1)),
                "directions": (f"{2 * j + 1}.parametrizations.weight.original1", lambda t: t),
                "magnitudes": (f"{2 * j + 1}.parametrizations.weight.original0", lambda t: t.reshape(-1, 1)),
                "biases": (f"{2 * j + 1}.bias", lambda t: t.reshape(1, -1)),
            }
            for name, (suffix, shape) in parts.items():
                target = getattr(nets, name)[j]
                stacked = torch.empty(target.shape, dtype=target.dtype)
                for pair in range(nets.pairs):
                    for r in range(nets.n_res):
                        for n, network in enumerate(("s_net", "t_net")):
                            key = _legacy_key(s, pair, f"{network}.blocks.{r}.{suffix}")
                            stacked[pair, r, n] = shape(state[key])
                out[f"{prefix}.{name}.{j}"] = stacked
        for scale in ("s_scale", "t_scale"):
            out[f"{prefix}.{scale}"] = torch.stack(
                [state[_legacy_key(s, pair, scale)] for pair in range(nets.pairs)]
            )
    return out

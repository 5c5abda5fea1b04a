"""The authors' checkpoints: read (and write) the state dicts of the published RG-Flow code.

The authors' training script (github hongyehu/RG-Flow, ``code/main.py``) saves
``torch.save({"flow": flow.state_dict(), "optimizer": ...}, "<epoch>.state")``. Their flow
is rgkern's ``variant="authors"`` (docs/design.md section 8). Its state dict, for sublayer ``i``
(``2h``: offset 0, ``2h + 1``: offset ``k * 2**h / 2``, the x -> z order of the "authors"
geometry), RNVP block ``J``, network ``net`` (``s_layers`` / ``t_layers``), residual block
``r`` and linear ``j`` of it:

* ``layers.i.{net}.J.res_blocks.r.{2j}.scale``: the Swish slope ``(w_in,)``;
* ``layers.i.{net}.J.res_blocks.r.{2j+1}.weight_g`` ``(w_out, 1)`` / ``weight_v``
  ``(w_out, w_in)`` (``torch.nn.utils.weight_norm``; newer torch writes
  ``parametrizations.weight.original0`` / ``original1``) and ``.bias`` ``(w_out,)``;
* ``layers.i.{net}.J.scale.scale`` ``(D,)``: the learned output scale, plus the buffers
  ``scale.saved_mean`` / ``saved_var`` (statistics for debugging, not part of the function);
* ``layers.i.mask_left`` / ``mask_right`` ``(C, k, k)``: the checkerboard masks;
* ``prior.scale``: the prior's scale at temperature 1 (``1/sqrt(2)`` Laplace, ``1`` Gaussian).

A ``module.`` or ``module.net.`` prefix (their multi-GPU wrappers) is stripped. Every tensor
must have exactly the shape the authors' modules give it, and ``prior.scale`` must name the
prior (or ``prior=`` be passed). Everything about
the architecture is read from the names and shapes: C and k from the masks, H from the number
of sublayers (so ``L = k * 2**(H-1)``), and per level the blocks, residual blocks, linears
and hidden width.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..core.errors import InputError, InputFileNotFoundError
from ..core.model import RGFlow

__all__ = ["load_authors_checkpoint", "authors_state_dict", "convert_authors_state_dict", "AuthorsCheckpointError"]

NETWORK_NAMES = ("s_layers", "t_layers")  # rgkern network index 0 = s, 1 = t
_LINEAR_KEY = re.compile(r"layers\.(\d+)\.(s_layers|t_layers)\.(\d+)\.res_blocks\.(\d+)\.(\d+)\.(.+)")
_SCALE_KEY = re.compile(r"layers\.(\d+)\.(s_layers|t_layers)\.(\d+)\.scale\.(scale|saved_mean|saved_var)")
_MASK_KEY = re.compile(r"layers\.(\d+)\.(mask_left|mask_right)")
_WEIGHT_NAMES = {
    "weight_g": "g", "weight_v": "v", "bias": "bias", "scale": "slope",
    "parametrizations.weight.original0": "g", "parametrizations.weight.original1": "v",
}
PRIOR_SCALES = {"laplace": 1 / math.sqrt(2), "gaussian": 1.0}


class AuthorsCheckpointError(InputError):
    """A file or state dict that is not a checkpoint of the authors' RG-Flow code."""


def _tensors(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AuthorsCheckpointError(f"entry {key!r} of the flow state dict is a {type(value).__name__}, expected a tensor")
        out[_strip_wrapper(key)] = value
    return out


# Key prefixes of the authors' multi-GPU wrappers: DataParallel's "module.", and their
# data_parallel_wrap's "module.net." (longest first).
_WRAPPER_PREFIXES = ("module.net.", "module.")


def _strip_wrapper(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _parse(state: dict) -> tuple[dict, dict, dict, dict]:
    """Sort the keys: linears[(i, net, J, r, m)][what], scales[(i, net, J)], masks[i], other."""
    linears, scales, masks, other = {}, {}, {}, {}
    for key, value in state.items():
        if m := _LINEAR_KEY.fullmatch(key):
            i, net, J, r, idx, what = m.groups()
            if what not in _WEIGHT_NAMES:
                raise AuthorsCheckpointError(f"unexpected tensor {key!r}: a residual block holds Swish 'scale' and weight-normalised linears")
            linears.setdefault((int(i), net, int(J), int(r), int(idx)), {})[_WEIGHT_NAMES[what]] = (key, value)
        elif m := _SCALE_KEY.fullmatch(key):
            i, net, J, what = m.groups()
            if what == "scale":
                scales[(int(i), net, int(J))] = (key, value)
        elif m := _MASK_KEY.fullmatch(key):
            masks.setdefault(int(m.group(1)), {})[m.group(2)] = (key, value)
        else:
            other[key] = value
    return linears, scales, masks, other


def _architecture(linears: dict, masks: dict, other: dict) -> dict:
    """RGFlow keyword arguments read from the parsed tensors."""
    if not masks:
        raise AuthorsCheckpointError(
            "no 'layers.<i>.mask_left' tensors: this is not a state dict of the authors' RG-Flow "
            f"(its first keys: {sorted(other)[:5]})"
        )
    sublayers = sorted(masks)
    if sublayers != list(range(len(sublayers))) or len(sublayers) % 2:
        raise AuthorsCheckpointError(f"expected an even number of sublayers numbered 0, 1, ..., found layers {sublayers}")
    key, mask = masks[0].get("mask_left", (None, None))
    if mask is None or mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
        raise AuthorsCheckpointError(f"layers.0.mask_left must have shape (C, k, k), got {None if mask is None else tuple(mask.shape)}")
    channels, kernel_size = int(mask.shape[0]), int(mask.shape[1])
    num_levels = len(sublayers) // 2
    per_sublayer = []
    for i in sublayers:
        blocks = sorted({J for (s, net, J, r, m) in linears if s == i})
        res = sorted({r for (s, net, J, r, m) in linears if s == i})
        mods = sorted({m for (s, net, J, r, m) in linears if s == i})
        if not blocks:
            raise AuthorsCheckpointError(f"sublayer layers.{i} has no s_layers/t_layers tensors")
        if blocks != list(range(len(blocks))) or res != list(range(len(res))) or mods != list(range(len(mods))) or len(mods) % 2:
            raise AuthorsCheckpointError(
                f"layers.{i}: blocks {blocks}, residual blocks {res} and modules {mods} must each be numbered 0, 1, ... "
                "(modules alternate Swish and Linear)"
            )
        first = linears.get((i, "s_layers", 0, 0, 1), {}).get("v")
        if first is None:
            raise AuthorsCheckpointError(f"layers.{i}.s_layers.0.res_blocks.0.1.weight_v is missing")
        per_sublayer.append(dict(n_layers=len(blocks), n_res=len(res), n_mlp=len(mods) // 2 - 1,
                                 hidden=int(first[1].shape[0]) if len(mods) > 2 else None))
    settings = {}
    for name in ("n_layers", "n_res", "n_mlp", "hidden"):
        values = []
        for h in range(num_levels):
            a, b = per_sublayer[2 * h][name], per_sublayer[2 * h + 1][name]
            if a != b:
                raise AuthorsCheckpointError(
                    f"{name} differs between the two sublayers of level {h} (layers.{2 * h}: {a}, layers.{2 * h + 1}: {b}); "
                    "rgkern shares these settings within a level"
                )
            values.append(a)
        settings[name] = tuple(values)
    # A level without hidden layers has no hidden width; any value builds the same model.
    settings["hidden"] = tuple(8 if v is None else v for v in settings["hidden"])
    return dict(image_size=kernel_size * 2 ** (num_levels - 1), channels=channels, kernel_size=kernel_size,
                **settings)


def _prior(other: dict) -> str:
    """The prior a file's ``prior.scale`` names, compared in the file's precision (a float16 file
    holds 1/sqrt(2) as 0.70703125)."""
    if "prior.scale" not in other:
        raise AuthorsCheckpointError(
            "the state dict has no prior.scale, so its prior cannot be inferred; pass prior='laplace' or "
            "prior='gaussian' (import-authors: --prior laplace or --prior gaussian)"
        )
    value = other["prior.scale"]
    scale = float(value)
    tolerance = max(1e-6, torch.finfo(value.dtype).eps) if value.dtype.is_floating_point else 1e-6
    prior = next((name for name, s in PRIOR_SCALES.items() if abs(scale - s) <= tolerance * s), None)
    if prior is None:
        raise AuthorsCheckpointError(
            f"prior.scale is {scale}, expected {PRIOR_SCALES['laplace']:.6f} (Laplace) or 1.0 (Gaussian) at temperature 1; "
            "pass prior=... to choose one"
        )
    return prior


def _authors_shape(what: str, rgkern_shape: torch.Size) -> tuple:
    """The shape the authors' modules give a tensor that rgkern holds as ``rgkern_shape``: the
    Swish slope ``(w_in,)`` and the bias ``(w_out,)`` flat, weight_g ``(w_out, 1)`` and weight_v
    ``(w_out, w_in)`` as they are (rgkern's layout, as :func:`authors_state_dict` writes it)."""
    return (rgkern_shape[-1],) if what in ("slope", "bias") else tuple(rgkern_shape)


def convert_authors_state_dict(state: dict, **overrides: object) -> tuple[RGFlow, dict]:
    """An rgkern ``variant="authors"`` model and its state dict from the authors' flow state dict.

    ``overrides`` replace the inferred RGFlow arguments (e.g. ``prior="gaussian"``,
    ``backend="triton"``). Raises :class:`AuthorsCheckpointError` naming the offending key
    for anything that does not fit.
    """
    if not isinstance(state, dict):
        raise AuthorsCheckpointError(f"expected the flow's state dict (a dict of tensors), got {type(state).__name__}")
    state = _tensors(state)
    linears, scales, masks, other = _parse(state)
    config = _architecture(linears, masks, other)
    config["prior"] = overrides["prior"] if "prior" in overrides else _prior(other)
    unknown = sorted(k for k in other if k != "prior.scale")
    if unknown:
        raise AuthorsCheckpointError(f"unexpected tensor {unknown[0]!r} in the authors' state dict ({len(unknown)} unexpected in all)")
    config.update(overrides)
    config["variant"] = "authors"
    model = RGFlow(**config)
    out = {}
    used = set()
    for i, sublayer in enumerate(model.sublayers):
        nets = sublayer.networks
        prefix = f"sublayers.{i}.networks"
        for j in range(nets.n_mlp + 1):
            parts = {"slopes": ("slope", 2 * j), "directions": ("v", 2 * j + 1), "magnitudes": ("g", 2 * j + 1), "biases": ("bias", 2 * j + 1)}
            for name, (what, module) in parts.items():
                target = getattr(nets, name)[j]
                stacked = torch.empty(target.shape, dtype=torch.float64)
                for J in range(nets.pairs):
                    for r in range(nets.n_res):
                        for n, net in enumerate(NETWORK_NAMES):
                            entry = linears.get((i, net, J, r, module), {}).get(what)
                            if entry is None:
                                raise AuthorsCheckpointError(
                                    f"missing tensor {what!r} of layers.{i}.{net}.{J}.res_blocks.{r}.{module}"
                                )
                            key, value = entry
                            expected = _authors_shape(what, stacked[J, r, n].shape)
                            if tuple(value.shape) != expected:
                                raise AuthorsCheckpointError(f"{key} has shape {tuple(value.shape)}, expected {expected}")
                            stacked[J, r, n] = value.reshape(stacked[J, r, n].shape)
                            used.add(key)
                out[f"{prefix}.{name}.{j}"] = stacked
        for scale_name, net in zip(("s_scale", "t_scale"), NETWORK_NAMES):
            rows = []
            for J in range(nets.pairs):
                key, value = scales.get((i, net, J), (f"layers.{i}.{net}.{J}.scale.scale", None))
                if value is None or tuple(value.shape) != (nets.dim,):
                    raise AuthorsCheckpointError(f"{key} must have shape ({nets.dim},), got {None if value is None else tuple(value.shape)}")
                rows.append(value.reshape(nets.dim))
                used.add(key)
            out[f"{prefix}.{scale_name}"] = torch.stack(rows).double()
    given = [k for group in linears.values() for k, _ in group.values()] + [k for k, _ in scales.values()]
    leftover = sorted(k for k in given if k not in used)
    if leftover:
        raise AuthorsCheckpointError(f"tensor {leftover[0]!r} does not fit the inferred architecture {config}")
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = model.to(dtype if dtype.is_floating_point else torch.float32)
    param_dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(param_dtype) for k, v in out.items()})
    return model, out


def load_authors_checkpoint(path: Path | str, **overrides: object) -> RGFlow:
    """An rgkern model (``variant="authors"``) from a ``<epoch>.state`` file of the authors' code.

    The file is read with ``torch.load(weights_only=True)``; it may be the training script's
    ``{"flow": state_dict, "optimizer": ...}`` or a bare state dict. The architecture is
    inferred (see the module docstring); ``overrides`` replace inferred RGFlow arguments.
    The model keeps the file's dtype and is on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"no authors' checkpoint at {path} (expected a .state file written by their main.py)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files it cannot unpickle
        raise AuthorsCheckpointError(f"{path} is not a torch.save file torch can load with weights_only=True: {error}") from None
    state = loaded.get("flow", loaded) if isinstance(loaded, dict) else loaded
    try:
        return convert_authors_state_dict(state, **overrides)[0]
    except AuthorsCheckpointError as error:
        raise AuthorsCheckpointError(f"{path}: {error}") from None


def authors_state_dict(model: RGFlow) -> dict:
    """``model``'s weights in the authors' key layout (the inverse of :func:`convert_authors_state_dict`).

    Needs ``variant="authors"``. The debugging buffers ``scale.saved_mean`` / ``saved_var``
    are written as zeros and ones, as the authors' modules are initialised.
    """
    if model.variant != "authors":
        raise InputError(f"the authors' layout holds only variant='authors' models, got variant={model.variant!r}")
    C, k = model.channels, model.geometry.kernel_size
    dtype = next(model.parameters()).dtype
    checker = model.geometry.mask[: k * k].view(k, k).to(dtype)
    out = {"prior.scale": torch.tensor(PRIOR_SCALES[model.prior.name], dtype=dtype)}
    for i, sublayer in enumerate(model.sublayers):
        nets = sublayer.networks
        out[f"layers.{i}.mask_left"] = checker.expand(C, k, k).clone()
        out[f"layers.{i}.mask_right"] = (1 - checker).expand(C, k, k).clone()
        for J in range(nets.pairs):
            for n, net in enumerate(NETWORK_NAMES):
                for r in range(nets.n_res):
                    for j in range(nets.n_mlp + 1):
                        base = f"layers.{i}.{net}.{J}.res_blocks.{r}"
                        out[f"{base}.{2 * j}.scale"] = nets.slopes[j][J, r, n].detach().flatten().clone()
                        out[f"{base}.{2 * j + 1}.weight_g"] = nets.magnitudes[j][J, r, n].detach().clone()
                        out[f"{base}.{2 * j + 1}.weight_v"] = nets.directions[j][J, r, n].detach().clone()
                        out[f"{base}.{2 * j + 1}.bias"] = nets.biases[j][J, r, n].detach().flatten().clone()
                scale = (nets.s_scale if n == 0 else nets.t_scale)[J].detach().clone()
                out[f"layers.{i}.{net}.{J}.scale.scale"] = scale
                out[f"layers.{i}.{net}.{J}.scale.saved_mean"] = torch.zeros_like(scale)
                out[f"layers.{i}.{net}.{J}.scale.saved_var"] = torch.ones_like(scale)
    return out

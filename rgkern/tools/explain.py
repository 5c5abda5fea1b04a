"""Explainability tools for a trained RG-Flow (paper sec. 3.4, 4.2-4.5, appendix D and H).

* :func:`receptive_field`, :func:`receptive_fields_per_level`: receptive fields (eq. 14),
  ``RF_l = E_z |dG(z)/dz_l|_c``, from Jacobian-vector products of the decoder evaluated on each
  latent's generation cone only, and the pictures of figure 5 (b, c) (:func:`plot_receptive_fields`, :func:`plot_receptive_field_histograms`).
* :func:`traverse`: vary one latent (or the C latents at one position) keeping the others fixed
  (figures 4 and 6).
* :func:`mixed_temperature_grid`: samples at a temperature per RG level (appendix D).
* :func:`scale_mix`, :func:`scale_mix_all_cuts`: hyperbolic mixing of two images across scales
  (sec. 4.5, eq. 15).
* :func:`progressive_generation`: decode with only the levels ``>= h`` kept, coarse to fine
  (figure 5 a).
* The subcommands ``receptive-fields``, ``traverse``, ``mix-temperature``, ``scale-mix`` and
  ``progressive``, each writing PNGs, are in :mod:`rgkern.cli.explain`.

Conventions shared by every function here
------------------------------------------
* A latent is named by its RG level ``h``, its pixel position ``(i, j)`` and its channel
  ``c``: it is ``z[:, c, i, j]``, and ``model.levels[i, j] == h``
  (:func:`latent_positions` lists the positions of a level). ``channel=None`` means the C
  latents at that position together.
* Inputs called ``z`` are latents ``(B, C, L, L)`` (a float tensor) or 8-bit images
  ``(B, C, L, L)`` (a ``uint8`` tensor, encoded at the bin centres, ``preprocess(...,
  dequantize=False)``). Inputs called ``x_a``, ``x_b`` are images: ``uint8``, or float tensors
  in model space.
* Outputs are model-space images (floats); :func:`rgkern.postprocess` turns them into
  ``uint8``. Nothing here changes the model or its training state, and no result carries
  autograd history.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..core.errors import InputError, InputTypeError
from ..core.preprocess import preprocess

if TYPE_CHECKING:
    from ..core.model import RGFlow, Temperature

__all__ = [
    "latent_positions",
    "receptive_field",
    "receptive_fields_per_level",
    "LevelReceptiveFields",
    "plot_receptive_fields",
    "plot_receptive_field_histograms",
    "traverse",
    "default_temperature_settings",
    "mixed_temperature_grid",
    "scale_mix",
    "scale_mix_all_cuts",
    "progressive_generation",
    "check_level",
    "check_channel",
    "as_latents",
    "as_model_space",
    "strongest_latent",
    "DEFAULT_TRAVERSAL_VALUES",
]

DEFAULT_TRAVERSAL_VALUES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


# --------------------------------------------------------------------------- checks
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _param(model) -> torch.Tensor:
    return next(model.parameters())


def check_level(model: RGFlow, level: object) -> int:
    """``level`` itself if it is an RG level of ``model`` (an int in ``0 .. H-1``), else ``ValueError``."""
    H = model.num_levels
    if not _is_int(level) or not 0 <= level < H:
        raise InputError(f"level {level!r} is out of range; expected an int in 0..{H - 1} (the model has {H} RG levels)")
    return level


def check_channel(model: RGFlow, channel: object) -> int | None:
    """``channel`` itself if it is ``None`` (all channels) or a channel index of ``model``, else ``ValueError``."""
    C = model.channels
    if channel is None:
        return None
    if not _is_int(channel) or not 0 <= channel < C:
        raise InputError(f"channel {channel!r} is out of range; expected None (all channels) or an int in 0..{C - 1}")
    return channel


def latent_positions(model: RGFlow, level: int) -> torch.Tensor:
    """LongTensor ``(P, 2)``: the pixel positions ``(i, j)`` of the latents of RG ``level``, row-major."""
    level = check_level(model, level)
    return (model.levels == level).nonzero()


def _check_positions(model, positions, level: int | None) -> torch.Tensor:
    """Positions as a LongTensor ``(P, 2)``, each inside the image and (if given) at ``level``."""
    L = model.image_size
    try:
        rows = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"positions must be an (i, j) pair of ints or a sequence of them, got {positions!r}") from None
    if rows.dim() == 1:
        rows = rows[None]
    if rows.dim() != 2 or rows.shape[1] != 2 or rows.shape[0] == 0 or rows.is_floating_point():
        raise InputError(f"positions must be an (i, j) pair of ints or a sequence of them, got {positions!r}")
    rows = rows.long()
    for i, j in rows.tolist():
        if not (0 <= i < L and 0 <= j < L):
            raise InputError(f"latent position ({i}, {j}) is outside the image; expected 0 <= i, j <= {L - 1}")
        if level is not None:
            found = int(model.levels[i, j])
            if found != level:
                examples = ", ".join(str(tuple(p)) for p in latent_positions(model, level)[:4].tolist())
                raise InputError(
                    f"latent position ({i}, {j}) holds a latent of RG level {found}, not level {level}; "
                    f"level-{level} latents sit at positions such as {examples} (see latent_positions)"
                )
    return rows


def as_latents(model: RGFlow, z: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, L, L)`` from latents (float) or 8-bit images (uint8, encoded at bin centres)."""
    if not isinstance(z, torch.Tensor):
        raise InputTypeError(f"z must be a torch.Tensor of latents (float) or 8-bit images (uint8), got {type(z).__name__}")
    if z.dtype == torch.uint8:
        param = _param(model)
        x, _ = preprocess(z.to(param.device), dequantize=False, dtype=param.dtype)
        with torch.no_grad():
            return model.encode(x)[0]
    _check_shape(model, z, "z")
    return z


def as_model_space(model: RGFlow, x: torch.Tensor, name: str) -> torch.Tensor:
    """Model-space images from 8-bit (uint8) or model-space (float) images."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor (uint8 images or model-space floats), got {type(x).__name__}")
    if x.dtype == torch.uint8:
        param = _param(model)
        return preprocess(x.to(param.device), dequantize=False, dtype=param.dtype)[0]
    return x


def _check_shape(model, x, name: str) -> None:
    C, L = model.channels, model.image_size
    if x.dim() != 4 or tuple(x.shape[1:]) != (C, L, L):
        raise InputError(f"{name} must have shape (B, {C}, {L}, {L}) for this model, got {tuple(x.shape)}")


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------- receptive fields
def _sample_or_check_latents(model, z, num_samples, temperature, generator) -> torch.Tensor:
    if z is None:
        return model.sample_latents(num_samples, temperature, generator=generator)
    return as_latents(model, z)


def _receptive_fields(model, z: torch.Tensor, elements: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Receptive fields ``(M, L, L)`` of the latents ``elements`` (LongTensor ``(M, 3)`` of ``(c, i, j)``).

    The derivative of every pixel with respect to one latent is a Jacobian-vector product
    ``J v`` of the decoder along the latent's unit vector ``v``, computed with the
    double-backward trick: ``g(u) = J^T u`` by one backward pass with ``create_graph=True``,
    then ``J v = d(g(u) . v)/du`` by a second one (PyTorch's forward-mode AD runs mixed dual and
    plain operands through slow Python decompositions, some 20 times slower here).

    The work runs on the latent's generation cone only:
    :class:`rgkern.locality.incremental.IncrementalDecoder` caches every sublayer's input
    from one full decode of ``z (N, C, L, L)``, and
    :func:`rgkern.locality.plans.run_cone_plan` re-evaluates just the patches of
    ``geometry.generation_patches`` for that latent's position. The latents of
    one position (one per channel) share a pass as rows of one batch. Pixels outside the cone
    are never computed, so their receptive field is exactly zero.
    """
    from ..locality.incremental import IncrementalDecoder
    from ..locality.plans import run_cone_plan

    N, C, L, _ = z.shape
    z = z.detach()
    decoder = IncrementalDecoder(model, z)
    sublayer_inputs = decoder.sublayer_inputs  # what each inverse sublayer reads, for run_cone_plan
    fields = z.new_zeros(elements.shape[0], L * L)
    elements = elements.cpu()
    positions = elements[:, 1] * L + elements[:, 2]
    for position in _progress(positions.unique().tolist(), progress, desc="receptive fields", unit="position"):
        rows = (positions == position).nonzero().flatten()
        channels = elements[rows, 0].to(z.device)
        R = len(rows)
        mask = torch.zeros(L * L, dtype=torch.bool)
        mask[position] = True
        plan = decoder.plan(mask.view(L, L))
        start = z.flatten(2)[:, :, position : position + 1].repeat_interleave(R, dim=0)  # (N*R, C, 1)
        direction = torch.zeros_like(start)
        direction.view(N, R, C)[:, torch.arange(R, device=z.device), channels] = 1
        with torch.enable_grad():
            start.requires_grad_(True)
            state = start.new_zeros(N * R, C, len(plan.positions)).index_copy(2, plan.start_slots, start)
            # The reference couplings: Triton's autograd Functions are not twice differentiable.
            out, _ = run_cone_plan(model, plan, state, sublayer_inputs, backend="torch")
            probe = torch.zeros_like(out, requires_grad=True)
            (transposed,) = torch.autograd.grad(out, start, probe, create_graph=True)
            (derivative,) = torch.autograd.grad(transposed, probe, direction)
        fields[rows.to(z.device)[:, None], plan.positions[None, :]] = derivative.view(N, R, C, -1).abs().sum(dim=2).mean(dim=0)
    return fields.view(-1, L, L)


def receptive_field(
    model: RGFlow,
    level: int,
    positions: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    z: torch.Tensor | None = None,
    num_samples: int = 16,
    channel: int | None = None,
    temperature: Temperature = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Receptive fields (eq. 14) of the latents of ``level`` at ``positions``.

    ``RF_l = mean over z of |dG(z)/dz_l|`` summed over colour channels, for each latent
    ``l = (level, i, j, channel)``.

    Args:
        model: an :class:`rgkern.RGFlow`.
        level: RG level of the latents, ``0 .. H-1``.
        positions: one ``(i, j)`` pair or a sequence / LongTensor ``(P, 2)`` of them; each must
            hold a latent of ``level`` (:func:`latent_positions`).
        z: latents ``(N, C, L, L)`` or uint8 images to average over; ``None`` draws
            ``num_samples`` latents from the prior at ``temperature`` with ``generator``.
        channel: the latent's channel, or ``None`` for each of the C latents at the position.
    Returns:
        float tensor ``(P, L, L)`` for an int ``channel``, ``(P, C, L, L)`` for ``channel=None``;
        without the leading ``P`` when ``positions`` is a single pair. Zero outside each
        latent's generation cone (``model.geometry.generation_cone``).
    """
    level = check_level(model, level)
    channel = check_channel(model, channel)
    rows = _check_positions(model, positions, level)
    single = torch.as_tensor(positions).dim() == 1
    z = _sample_or_check_latents(model, z, num_samples, temperature, generator)
    channels = list(range(model.channels)) if channel is None else [channel]
    elements = torch.tensor([(c, i, j) for i, j in rows.tolist() for c in channels], device=z.device)
    fields = _receptive_fields(model, z, elements)
    fields = fields.view(rows.shape[0], len(channels), *fields.shape[1:])
    if channel is not None:
        fields = fields[:, 0]
    return fields[0] if single else fields


@dataclass
class LevelReceptiveFields:
    """Receptive fields of some latents of one RG level.

    Attributes:
        level: the RG level ``h``.
        latents: LongTensor ``(M, 3)``, each row ``(c, i, j)``: latent ``z[:, c, i, j]``.
        fields: float tensor ``(M, L, L)``, the receptive field of each latent (eq. 14).
        strengths: float tensor ``(M,)``, each field averaged over pixels (figure 5 c).
    """

    level: int
    latents: torch.Tensor
    fields: torch.Tensor

    @property
    def strengths(self) -> torch.Tensor:
        return self.fields.mean(dim=(1, 2))


def receptive_fields_per_level(
    model: RGFlow,
    per_level: int | None = 8,
    z: torch.Tensor | None = None,
    num_samples: int = 16,
    temperature: Temperature = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[LevelReceptiveFields]:
    """Receptive fields of ``per_level`` randomly chosen latents of every RG level (figures 5, H1-H4).

    Args:
        per_level: latents per level (all channels and positions of the level are candidates,
            drawn without replacement with ``generator``); ``None`` for every latent of each level.
        z, num_samples, temperature, generator: the batch the fields are averaged over, as in
            :func:`receptive_field` (one batch, shared by all levels).
        progress: show a tqdm progress bar.
    Returns:
        a list of H :class:`LevelReceptiveFields`, level 0 first; latents sorted by ``(c, i, j)``.
    """
    if per_level is not None and (not _is_int(per_level) or per_level <= 0):
        raise InputError(f"per_level must be a positive int or None (all latents), got {per_level!r}")
    z = _sample_or_check_latents(model, z, num_samples, temperature, generator)
    chosen = []
    for h in range(model.num_levels):
        candidates = (model.geometry.latent_level_of_elements() == h).nonzero()  # (n, 3) of (c, i, j)
        if per_level is not None and per_level < candidates.shape[0]:
            pick = torch.randperm(candidates.shape[0], generator=generator)[:per_level].sort().values
            candidates = candidates[pick]
        chosen.append(candidates.to(z.device))
    fields = _receptive_fields(model, z, torch.cat(chosen), progress=progress)
    out, start = [], 0
    for h, latents in enumerate(chosen):
        out.append(LevelReceptiveFields(h, latents.cpu(), fields[start : start + latents.shape[0]].cpu()))
        start += latents.shape[0]
    return out


def strongest_latent(model: RGFlow, level: int, z: torch.Tensor, channel: int | None = None) -> tuple[int, int]:
    """Position ``(i, j)`` of the latent of ``level`` with the strongest receptive field on ``z``."""
    positions = latent_positions(model, level)
    fields = receptive_field(model, level, positions, z, channel=channel)
    strengths = fields.flatten(1).mean(dim=1)
    return tuple(positions[int(strengths.argmax())].tolist())


def plot_receptive_fields(results: Sequence[LevelReceptiveFields], path: Path | str, columns: int | None = None,
                          cell: float = 0.9) -> Path:
    """Figure 5 (b): a grid of receptive fields, one row per level (top level first), each scaled to max 1.

    Writes a PNG at ``path`` (matplotlib's Agg canvas, no ``pyplot``) and returns the path.
    ``columns`` caps the fields shown per level (default: all of them).
    """
    from matplotlib.figure import Figure

    columns = columns or max(r.fields.shape[0] for r in results)
    figure = Figure(figsize=(cell * columns + 0.6, cell * len(results) + 0.3), dpi=100)
    axes = figure.subplots(len(results), columns, squeeze=False)
    for row, result in zip(axes, reversed(results)):
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= result.fields.shape[0]:
                ax.axis("off")
                continue
            field = result.fields[col].float()
            image = (field / field.max().clamp_min(1e-30)).numpy()
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            c, i, j = result.latents[col].tolist()
            ax.set_title(f"({i},{j}) c{c}", fontsize=5, pad=1)
        row[0].set_ylabel(f"h = {result.level}", fontsize=7)
    figure.suptitle("receptive fields, each scaled to max 1 (title: position, channel)", fontsize=7)
    figure.tight_layout(pad=0.3)
    return _save_figure(figure, path)


def plot_receptive_field_histograms(results: Sequence[LevelReceptiveFields], path: Path | str, bins: int = 30) -> Path:
    """Figure 5 (c): per level, a histogram of receptive-field strengths (log count). Writes a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.2 * len(results), 2.0), dpi=100)
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results):
        ax.hist(result.strengths.numpy(), bins=bins, log=True, color="tab:blue")
        ax.set_title(f"h = {result.level} ({result.fields.shape[0]} latents)", fontsize=7)
        ax.set_xlabel("strength (mean per pixel)", fontsize=6)
        ax.tick_params(which="both", labelsize=6)
    axes[0].set_ylabel("count (log)", fontsize=7)
    figure.tight_layout(pad=0.4)
    return _save_figure(figure, path)


def _save_figure(figure, path) -> Path:
    from .files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))  # a failure leaves an older picture intact
    return path


# --------------------------------------------------------------------------- traversal
@torch.no_grad()
def traverse(model: RGFlow, z: torch.Tensor, level: int, position: Sequence[int] | torch.Tensor, channel: int | None = None,
             values: Sequence[float] | torch.Tensor = DEFAULT_TRAVERSAL_VALUES) -> torch.Tensor:
    """Latent traversal (figures 4, 6): set one latent to each of ``values``, keep the others.

    Args:
        z: latents ``(B, C, L, L)`` (float) or 8-bit images (uint8, encoded first).
        level, position: the latent's RG level and pixel position ``(i, j)`` (at that level).
        channel: the latent's channel, or ``None`` to set the C latents at ``position`` together.
        values: the values the latent(s) take (absolute, not offsets), a sequence of floats.
    Returns:
        model-space images ``(B, V, C, L, L)``, ``V = len(values)``; image ``[b, v]`` is
        ``decode(z[b])`` with the latent(s) set to ``values[v]``.
    """
    level = check_level(model, level)
    channel = check_channel(model, channel)
    rows = _check_positions(model, position, level)
    if rows.shape[0] != 1:
        raise InputError(f"position must be one (i, j) pair, got {rows.shape[0]} positions")
    (i, j), = rows.tolist()
    z = as_latents(model, z)
    values = torch.as_tensor(values, dtype=z.dtype, device=z.device).flatten()
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise InputError(f"values must be a non-empty sequence of finite floats, got {values.tolist()}")
    B, V = z.shape[0], values.numel()
    grid = z[:, None].repeat(1, V, 1, 1, 1)
    channels = slice(None) if channel is None else slice(channel, channel + 1)
    grid[:, :, channels, i, j] = values.view(1, V, 1)
    return model.decode(grid.flatten(0, 1)).view(B, V, *z.shape[1:])


# --------------------------------------------------------------------------- mixed temperature
def default_temperature_settings(num_levels: int) -> list[tuple[float, ...]]:
    """Per-level temperature tuples (level 0 first) compared by :func:`mixed_temperature_grid` by default.

    In order: all levels at 1.0; the paper's figure 6 setting (``T_0 = 0.2``, others 0.6); high
    temperature at the top level and low below (top 1.0, others 0.2); the reverse (top 0.2,
    others 1.0); all at 0 (the prior's mode, ``decode(0)``).
    """
    H = num_levels
    return [
        (1.0,) * H,
        (0.2,) + (0.6,) * (H - 1),
        (0.2,) * (H - 1) + (1.0,),
        (1.0,) * (H - 1) + (0.2,),
        (0.0,) * H,
    ]


@torch.no_grad()
def mixed_temperature_grid(model: RGFlow, settings: Sequence[Temperature] | None = None, n: int = 8,
                           generator: torch.Generator | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """Samples at a temperature per RG level (appendix D), one row per setting.

    Every row decodes the same unit-temperature draw ``u`` scaled per latent,
    ``z = T_level * u``: both priors are scale families (Laplace scale and Gaussian std are
    proportional to T), so each row is a sample at its temperatures and rows differ only in
    the temperatures. A setting of 0 at every level gives ``decode(0)``.

    Args:
        settings: a sequence of settings, each a float or a sequence of H per-level
            temperatures (level 0 first); ``None`` for :func:`default_temperature_settings`.
        n, generator: draw ``u`` as ``n`` prior latents at temperature 1 with ``generator``.
        z: or give ``u`` yourself, latents ``(n, C, L, L)`` at temperature 1.
    Returns:
        model-space images ``(S, n, C, L, L)``, ``S = len(settings)``.
    """
    settings = default_temperature_settings(model.num_levels) if settings is None else list(settings)
    if not settings:
        raise InputError("settings must hold at least one temperature setting, got an empty sequence")
    if z is None:
        unit = model.sample_latents(n, 1.0, generator=generator)
    else:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise InputTypeError(f"z must be float latents (n, C, L, L) at temperature 1, got {type(z).__name__} {getattr(z, 'dtype', '')}")
        _check_shape(model, z, "z")
        unit = z
    temperatures = [model.temperature_map(s, unit.device, unit.dtype) for s in settings]
    return torch.stack([model.decode(unit * t) for t in temperatures])


# --------------------------------------------------------------------------- scale mixing
def _check_pair(model, x_a, x_b) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("x_a", x_a), ("x_b", x_b)):
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor (uint8 images or model-space floats), got {type(x).__name__}")
    if tuple(x_a.shape) != tuple(x_b.shape):
        raise InputError(
            f"images to mix must have the same shape, got x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)}"
        )
    return as_model_space(model, x_a, "x_a"), as_model_space(model, x_b, "x_b")


def _check_cut(model, cut) -> int:
    H = model.num_levels
    if not _is_int(cut) or not 0 <= cut <= H:
        raise InputError(
            f"cut {cut!r} is out of range; expected an int in 0..{H} "
            f"(0 = below level 0, {H} = above the top level {H - 1})"
        )
    return cut


def _mix(model, z_a, z_b, cut: int) -> torch.Tensor:
    from_a = model.geometry.latent_level_of_elements(z_a.device) < cut
    return model.decode(torch.where(from_a, z_a, z_b))


@torch.no_grad()
def scale_mix(model: RGFlow, x_a: torch.Tensor, x_b: torch.Tensor, cut: int) -> torch.Tensor:
    """Hyperbolic (scale) mixing, sec. 4.5: latents of levels below ``cut`` from ``x_a``, the rest from ``x_b``.

    ``cut`` is a boundary between RG levels, ``0 .. H``: cut ``c`` lies between level ``c - 1``
    and level ``c``. The first image ``x_a`` gives the fine levels ``h < cut`` (small-scale
    detail), the second image ``x_b`` the coarse levels ``h >= cut`` (large-scale features).
    So ``cut = H`` (above the top level) returns ``x_a`` and ``cut = 0`` (below level 0)
    returns ``x_b``, up to round-off. In the paper's eq. 15 this is ``z_A = encode(x_b)``,
    ``z_B = encode(x_a)`` and threshold ``Θ = cut``.

    Args:
        x_a, x_b: images of the same shape ``(B, C, L, L)``: uint8, or model-space floats.
        cut: int in ``0 .. H``.
    Returns:
        model-space images ``(B, C, L, L)``.
    """
    cut = _check_cut(model, cut)
    x_a, x_b = _check_pair(model, x_a, x_b)
    return _mix(model, model.encode(x_a)[0], model.encode(x_b)[0], cut)


@torch.no_grad()
def scale_mix_all_cuts(model: RGFlow, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """:func:`scale_mix` at every cut: model-space images ``(B, H + 1, C, L, L)``, index = cut.

    Column 0 reproduces ``x_b``, column ``H`` reproduces ``x_a``.
    """
    x_a, x_b = _check_pair(model, x_a, x_b)
    z_a, z_b = model.encode(x_a)[0], model.encode(x_b)[0]
    return torch.stack([_mix(model, z_a, z_b, cut) for cut in range(model.num_levels + 1)], dim=1)


# --------------------------------------------------------------------------- progressive generation
@torch.no_grad()
def progressive_generation(model: RGFlow, z: torch.Tensor) -> torch.Tensor:
    """Progressive generation, figure 5 (a): decode keeping the levels ``>= h``, the rest at 0.

    Zero is the mode of both priors. Column ``t`` of the result uses ``h = H - t``, so the
    columns run coarse to fine: ``h = H`` (every latent zero, ``decode(0)``), ``H - 1`` (only the
    top level kept), ..., ``0`` (all kept, ``decode(z)``).

    Args:
        z: latents ``(B, C, L, L)`` (float) or 8-bit images (uint8, encoded first).
    Returns:
        model-space images ``(B, H + 1, C, L, L)``.
    """
    z = as_latents(model, z)
    levels = model.geometry.latent_level_of_elements(z.device)
    H = model.num_levels
    return torch.stack([model.decode(z * (levels >= h)) for h in range(H, -1, -1)], dim=1)

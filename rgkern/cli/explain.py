"""The explainability subcommands: ``receptive-fields``, ``traverse``, ``mix-temperature``,
``scale-mix`` and ``progressive`` (see ``docs/explain.md``), over :mod:`rgkern.tools.explain`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import InputError
from ..core.preprocess import postprocess
from ..tools.explain import (
    DEFAULT_TRAVERSAL_VALUES,
    as_latents,
    as_model_space,
    check_channel,
    check_level,
    default_temperature_settings,
    mixed_temperature_grid,
    plot_receptive_field_histograms,
    plot_receptive_fields,
    progressive_generation,
    receptive_fields_per_level,
    scale_mix,
    scale_mix_all_cuts,
    strongest_latent,
    traverse,
)
from .options import (
    add_checkpoint_option,
    add_common_options,
    checkpoint_path,
    nonnegative_int,
    positive_int,
    seed,
    setup_runtime,
    temperature,
)

__all__ = [
    "add_cli",
    "run_receptive_fields",
    "run_traverse",
    "run_mix_temperature",
    "run_scale_mix",
    "run_progressive",
]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _load(args):
    from ..tools.checkpoint import load_model

    model = load_model(checkpoint_path(args.checkpoint), device=setup_runtime(args))
    return model, torch.Generator().manual_seed(args.seed)


def _draw_latents(model, n: int, temperature, generator) -> torch.Tensor:
    """Prior latents drawn on the CPU (so a seed gives the same picture on every device)."""
    return model.sample_latents(n, temperature, generator=generator, device="cpu").to(_device(model))


def _data_images(args, model, count: int, offset: int = 0) -> torch.Tensor:
    """``count`` uint8 test images of ``--data`` from index ``offset``, checked against the model."""
    from ..data import load_dataset

    dataset = load_dataset(args.data, root=args.data_root, split="test", size=offset + count, seed=args.seed,
                           progress=not args.no_progress)
    if len(dataset) < offset + count:
        raise InputError(f"--data {args.data} has {len(dataset)} test images, {offset + count} are needed")
    images = torch.stack([dataset[k] for k in range(offset, offset + count)])
    C, L = model.channels, model.image_size
    if tuple(images.shape[1:]) != (C, L, L):
        raise InputError(
            f"--data {args.data} has images of shape {tuple(images.shape[1:])}, the model expects ({C}, {L}, {L})"
        )
    return images.to(_device(model))


def _inputs(args, model, generator, count: int, offset: int = 0) -> torch.Tensor:
    """uint8 test images of ``--data``, or latents drawn from the prior at ``--temperature``."""
    if args.data:
        return _data_images(args, model, count, offset)
    return _draw_latents(model, count, args.temperature, generator)


def _save_rows(images: torch.Tensor, args) -> Path:
    """Model-space images ``(rows, columns, C, L, L)`` as one PNG grid at ``args.out`` (finite, or an error)."""
    from ..tools.plots import save_image_grid

    finite = torch.isfinite(images).flatten(2).all(dim=2)
    if not bool(finite.all()):
        bad = [tuple(i) for i in torch.nonzero(~finite).tolist()][:10]
        raise InputError(
            f"the pictures hold NaN or inf at (row, column) {bad}; nothing was written to {args.out!r}: the model "
            "failed numerically there (try smaller latent values or a lower --temperature)"
        )
    path = save_image_grid(postprocess(images.flatten(0, 1).cpu()), args.out, nrow=images.shape[1], scale=args.scale)
    print(f"wrote {path} ({images.shape[0]} rows x {images.shape[1]} columns)")
    return path


def _save_gif(images: torch.Tensor, labels, args) -> Path:
    """Model-space images ``(rows, frames, C, L, L)`` (finite: :func:`_save_rows` checked them) as an animated GIF at ``args.gif``.

    Frame ``t`` shows column ``t`` of every row, as a grid, under ``labels[t]``.
    """
    from ..tools.plots import save_gif

    frames = [postprocess(images[:, t].cpu()) for t in range(images.shape[1])]
    path = save_gif(frames, args.gif, labels=list(labels), scale=args.scale, duration=args.frame_ms)
    print(f"wrote {path} ({len(frames)} frames of {images.shape[0]} images)")
    return path


#: The most receptive fields ``receptive-fields`` draws per level in its picture.
MAX_FIELDS_SHOWN_PER_LEVEL = 64


def _hist_out(args) -> Path:
    """Where ``receptive-fields`` writes its histogram: ``--hist-out``, or OUT with -hist before .png."""
    return Path(args.hist_out) if args.hist_out else Path(args.out).with_name(Path(args.out).stem + "-hist.png")


def _outputs(args: argparse.Namespace) -> list:
    """``(option, path, suffix)`` of every file the command writes."""
    outputs = [("--out", Path(args.out), ".png")]
    if hasattr(args, "hist_per_level"):  # receptive-fields: the histogram beside the picture
        outputs.append(("--hist-out", _hist_out(args), ".png"))
    if getattr(args, "gif", None) is not None:
        outputs.append(("--gif", Path(args.gif), ".gif"))
    return outputs


@contextlib.contextmanager
def _several_outputs_locked(args: argparse.Namespace) -> Iterator[None]:
    """With two or more outputs, hold the lock of each of their folders (in one order) for the
    command: two runs writing the same files cannot leave a picture of one beside a GIF of
    the other, and no run writes into a run folder another command holds."""
    from ..tools.files import run_lock

    folders = sorted({os.path.realpath(path.parent) for _, path, _ in _outputs(args)})
    with contextlib.ExitStack() as held:
        if len(_outputs(args)) > 1:
            for folder in folders:
                held.enter_context(run_lock(folder))
        yield


def _check_outputs(args) -> None:
    """Check every file the command will write, before any work: each name ends as what is
    written there (PNG pictures, a GIF), no two name one file (the second would replace the
    first), and each can be written. A checkpoint or a run's document (``.safetensors``,
    ``.json``) is never a picture's name, so no picture replaces one."""
    from ..tools.sampling import check_writable

    seen = {}
    for option, path, suffix in _outputs(args):
        if path.suffix.lower() != suffix:
            raise InputError(f"{option} takes a file name ending in {suffix} (it writes {suffix[1:].upper()}), got {str(path)!r}")
        where = path.resolve()
        if where in seen:
            raise InputError(f"{option} and {seen[where]} name the same file {str(path)!r}; give each its own")
        seen[where] = option
        check_writable(path)


def run_receptive_fields(args: argparse.Namespace) -> int:
    _check_outputs(args)
    with _several_outputs_locked(args):
        if args.per_level > MAX_FIELDS_SHOWN_PER_LEVEL:
            raise InputError(
                f"--per-level {args.per_level}: the picture shows at most {MAX_FIELDS_SHOWN_PER_LEVEL} fields per level "
                "(a larger count makes a picture no one can read, after a long wait); the histogram counts every latent "
                "by default (--hist-per-level 0)"
            )
        model, generator = _load(args)
        z = _inputs(args, model, generator, args.num)
        shown = receptive_fields_per_level(model, args.per_level, z=z, generator=generator, progress=not args.no_progress)
        print(f"wrote {plot_receptive_fields(shown, args.out)}")
        hist_out = _hist_out(args)
        counted = None if args.hist_per_level == 0 else args.hist_per_level
        histogram = receptive_fields_per_level(model, counted, z=z, generator=generator, progress=not args.no_progress)
        print(f"wrote {plot_receptive_field_histograms(histogram, hist_out)}")
        for result in histogram:
            strengths = result.strengths
            print(f"level {result.level}: {len(strengths)} latents, strength median {float(strengths.median()):.3g}, "
                  f"max {float(strengths.max()):.3g}")
        return 0


def run_traverse(args: argparse.Namespace) -> int:
    _check_outputs(args)
    with _several_outputs_locked(args):
        model, generator = _load(args)
        level = check_level(model, model.num_levels - 1 if args.level is None else args.level)
        channel = check_channel(model, args.channel)
        z = as_latents(model, _inputs(args, model, generator, args.num))
        position = tuple(args.position) if args.position else strongest_latent(model, level, z, channel)
        values = args.values or list(DEFAULT_TRAVERSAL_VALUES)
        images = traverse(model, z, level, position, channel, values)
        which = "all channels" if channel is None else f"channel {channel}"
        print(f"traversed the level-{level} latent at position {position}, {which}, values {values}")
        _save_rows(images, args)
        if args.gif is not None:
            _save_gif(images, [f"level {level} latent {position}: {value:g}" for value in values], args)
        return 0


def run_mix_temperature(args: argparse.Namespace) -> int:
    _check_outputs(args)
    model, generator = _load(args)
    settings = args.setting or default_temperature_settings(model.num_levels)
    unit = _draw_latents(model, args.num, 1.0, generator)
    _save_rows(mixed_temperature_grid(model, settings, z=unit), args)
    print("rows (temperature per level, level 0 first): " + "; ".join(str(s) for s in settings))
    return 0


def run_scale_mix(args: argparse.Namespace) -> int:
    _check_outputs(args)
    model, generator = _load(args)
    if args.data:
        x_a, x_b = (as_model_space(model, _data_images(args, model, args.num, o), "x") for o in (0, args.num))
    else:
        x_a, x_b = (model.decode(_draw_latents(model, args.num, args.temperature, generator)) for _ in range(2))
    if args.cut is None:
        mixed = scale_mix_all_cuts(model, x_a, x_b).flip(1)  # cut H, ..., 0: from x_a towards x_b
    else:
        mixed = scale_mix(model, x_a, x_b, args.cut)[:, None]
    _save_rows(torch.cat([x_a[:, None], mixed, x_b[:, None]], dim=1), args)
    return 0


def run_progressive(args: argparse.Namespace) -> int:
    _check_outputs(args)
    with _several_outputs_locked(args):
        model, generator = _load(args)
        inputs = _inputs(args, model, generator, args.num)
        columns = progressive_generation(model, inputs)
        H = model.num_levels
        labels = ["all latents 0"] + [f"levels >= {h} kept" for h in range(H - 1, 0, -1)] + ["all levels"]
        if args.data:
            columns = torch.cat([columns, as_model_space(model, inputs, "images")[:, None]], dim=1)
            labels.append("original")
        _save_rows(columns, args)
        if args.gif is not None:
            _save_gif(columns, labels, args)
        return 0


def _gif_options(parser: argparse.ArgumentParser, frames: str) -> None:
    parser.add_argument("--gif", default=None, metavar="OUT.gif", help=f"also write an animated GIF, one frame per {frames}")
    parser.add_argument("--frame-ms", type=positive_int, default=500, help="milliseconds per GIF frame (default 500)")


def _options(parser: argparse.ArgumentParser, num: int, data_help: str | None) -> None:
    add_checkpoint_option(parser)
    parser.add_argument("--out", required=True, help="PNG file to write")
    if data_help:
        parser.add_argument("--data", default=None, help=data_help)
        parser.add_argument("--data-root", default=None, help="data folder (cifar10, folder); a cache folder for msds1/msds2")
        parser.add_argument("--temperature", type=temperature, default=1.0,
                            help="prior temperature of drawn latents: one value, or one per level (T0,T1,...)")
    parser.add_argument("--num", type=positive_int, default=num, help="images (rows) per picture (default %(default)s)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the latents drawn and of the data, 0 .. 2**63 - 1 (default 0)")
    parser.add_argument("--scale", type=positive_int, default=3, help="pixel scale of image grids (default 3)")
    add_common_options(parser)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the explainability subcommands to an ``argparse`` subparsers object.

    ``receptive-fields``, ``traverse``, ``mix-temperature``, ``scale-mix`` and ``progressive``
    (see ``docs/explain.md``); each stores its handler as ``func``: ``args.func(args)`` writes
    the PNG(s) and returns the exit code 0. Images come from ``--data NAME`` (its test split)
    or, without it, from latents drawn from the prior with ``--seed``.
    """
    p = subparsers.add_parser(
        "receptive-fields",
        help="receptive fields per RG level (figure 5 b) and histograms of their strengths (figure 5 c)",
        description="Receptive fields (eq. 14) of randomly chosen latents of every RG level, each scaled to "
        "max 1, as a grid (OUT), and histograms of the strengths of all latents per level (--hist-out).",
    )
    _options(p, 8, "average over these test images (e.g. msds1) instead of prior samples")
    p.add_argument("--per-level", type=positive_int, default=8, help="fields shown per level (default 8, at most 64)")
    p.add_argument("--hist-out", default=None, help="histogram PNG (default: OUT with -hist before .png)")
    p.add_argument("--hist-per-level", type=nonnegative_int, default=0, help="latents per level in the histogram (default 0 = all)")
    p.set_defaults(func=run_receptive_fields)

    p = subparsers.add_parser(
        "traverse",
        help="vary one latent, keeping the others (figures 4, 6)",
        description="One row per image: the latent(s) at --level/--position set to each of --values.",
    )
    _options(p, 4, "traverse these test images (e.g. msds1) instead of prior samples")
    p.add_argument("--level", type=int, default=None, help="RG level of the latent (default: the top level)")
    p.add_argument("--position", type=int, nargs=2, metavar=("I", "J"), default=None,
                   help="pixel position of the latent (default: the level's strongest receptive field on these images)")
    p.add_argument("--channel", type=int, default=None, help="latent channel (default: all C channels together)")
    p.add_argument("--values", type=float, nargs="+", default=None, help="latent values (default -3 -2 ... 3)")
    _gif_options(p, "latent value (every image of the picture at that value)")
    p.set_defaults(func=run_traverse)

    p = subparsers.add_parser(
        "mix-temperature",
        help="samples at a temperature per RG level, one row per setting (appendix D)",
        description="Each row decodes the same prior draw at its own temperatures per level.",
    )
    _options(p, 8, None)
    p.add_argument("--setting", type=temperature, action="append", default=None, metavar="T0,T1,...",
                   help="one row: temperatures per level (level 0 first) or one value; repeatable "
                        "(default: rgkern.tools.explain.default_temperature_settings)")
    p.set_defaults(func=run_mix_temperature)

    p = subparsers.add_parser(
        "scale-mix",
        help="hyperbolic mixing of two images across RG levels (sec. 4.5)",
        description="One row per pair: first image, mixes for cut = H .. 0 (levels below the cut from the "
        "first image, the rest from the second), second image.",
    )
    _options(p, 4, "mix test images (e.g. msds1) 0..N-1 (first) with N..2N-1 (second) instead of prior samples")
    p.add_argument("--cut", type=int, default=None, help="one cut in 0..H (default: every cut)")
    p.set_defaults(func=run_scale_mix)

    p = subparsers.add_parser(
        "progressive",
        help="progressive generation, coarse to fine (figure 5 a)",
        description="One row per image: decode with the levels >= h kept (others 0), h = H .. 0, then the "
        "original when --data is given.",
    )
    _options(p, 6, "encode these test images (e.g. msds1) instead of prior samples")
    _gif_options(p, "step (column of the picture)")
    p.set_defaults(func=run_progressive)

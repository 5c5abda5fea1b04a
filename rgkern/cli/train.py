"""The ``train``, ``sample`` and ``evaluate`` subcommands.

``train`` under ``torchrun --nproc_per_node=N -m rgkern train ...`` trains with
DistributedDataParallel (:mod:`rgkern.tools.distributed`); only rank 0 prints and writes
the plot and the samples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..core.errors import InputError
from .options import (
    add_checkpoint_option,
    add_common_options,
    add_speed_options,
    checkpoint_path,
    default_device,
    nonnegative_int,
    positive_float,
    positive_int,
    seed,
    setup_runtime,
)

__all__ = ["add_cli", "run_train", "run_sample", "run_evaluate"]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``sample`` and ``evaluate`` to an ``argparse`` subparsers object."""
    _add_train(subparsers)
    _add_sample(subparsers)
    _add_evaluate(subparsers)


# ----------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    from ..data import DATASET_NAMES
    from ..tools.presets import LR_SCHEDULES, preset_names

    parser = subparsers.add_parser(
        "train",
        help="train a model (writes checkpoint, history, bits/dim plot and samples)",
        description="Train RG-Flow by maximum likelihood. Settings left out come from the preset (with --resume, from the run being continued). "
        "Writes OUT/model.safetensors (+ model.json), OUT/history.json, OUT/bpd.png, OUT/samples.png and OUT/data.png (training images, for comparison). "
        "On MSDS data it records the samples' quality score (rgkern.tools.quality) at every evaluation and prints it at the end beside the data's. "
        "A run whose loss or gradient norm becomes NaN or infinite stops before that update with 'rgkern train: training diverged: ...' "
        "and exit code 3; its last checkpoint is kept.",
    )
    parser.add_argument(
        "--preset", default=None,
        help=f"one of {', '.join(preset_names())} (default: cpu; with --resume, the run's own)",
    )
    parser.add_argument("--data", default=None, help=f"dataset: {', '.join(DATASET_NAMES)} (default: the preset's)")
    parser.add_argument(
        "--data-root", default=None,
        help="data folder (cifar10, celeba: img_align_celeba or its parent, mnist: the idx files, folder); a cache folder for msds1/msds2",
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    parser.add_argument("--steps", type=positive_int, default=None, help="total optimiser steps")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch size (split over the processes under torchrun)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the preset's; 1e-3 in the paper presets)")
    parser.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default=None,
        help="learning rate over the run: constant; cosine decay to 0 at the last step; or wsd: constant, then a linear "
             "decay to 0 over the last --decay-steps steps (default: the preset's)",
    )
    parser.add_argument(
        "--warmup-steps", type=nonnegative_int, default=None,
        help="linear learning-rate warm-up over the first N steps (default: the preset's; 0 in the paper presets)",
    )
    parser.add_argument(
        "--decay-steps", type=nonnegative_int, default=None,
        help="with --lr-schedule wsd: the length of the final linear decay, in steps",
    )
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 5e-5)")
    parser.add_argument("--clip-norm", type=float, default=None, help="clip gradients at this global norm; 0: no clipping (default 1)")
    parser.add_argument("--hflip", action="store_true", help="flip each training image left-right with probability 1/2, anew every batch (the paper's CelebA training)")
    _add_model_options(parser)
    parser.add_argument("--eval-every", type=positive_int, default=None, help="held-out bits/dim every N steps")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None, help="checkpoint every N steps")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model (log-dets, prior and loss stay float32)")
    add_speed_options(parser, "model's log-likelihood (forward and backward)")
    parser.add_argument(
        "--activation-checkpointing", action="store_true",
        help="recompute each RNVP block in the backward pass instead of saving its activations (less memory, more work)",
    )
    parser.add_argument(
        "--time-limit", type=positive_float, default=None, metavar="MINUTES",
        help="stop training after this many minutes (evaluate and checkpoint there; --resume goes on)",
    )
    parser.add_argument("--seed", type=seed, default=None, help="seed of initialisation, data order and noise, 0 .. 2**63 - 1 (default 0)")
    parser.add_argument("--train-size", type=positive_int, default=None, help="use the first N training images")
    parser.add_argument("--test-size", type=positive_int, default=None, help="held-out bits/dim on the first N test images")
    temperatures = parser.add_mutually_exclusive_group()
    temperatures.add_argument(
        "--sample-temperatures", nargs="+", default=None, metavar="T",
        help="temperatures of OUT/samples.png, one labelled row group each, and of the MSDS quality score; "
        "each a float or one per RG level, comma-separated (default: 1.0 0.7)",
    )
    temperatures.add_argument("--sample-temperature", default=None, metavar="T", help="one temperature only: the same as --sample-temperatures T")
    parser.add_argument("--num-samples", type=positive_int, default=64, help="images per temperature in OUT/samples.png (default 64)")
    add_common_options(parser)
    parser.set_defaults(func=run_train)


#: Samples per temperature (and data images) of the quality score printed at the end of training.
FINAL_QUALITY_SAMPLES = 256

_PER_LEVEL_OPTIONS = (("n_layers", 0), ("hidden", 1), ("n_res", 1), ("n_mlp", 0))  # name, smallest entry


def _add_model_options(parser) -> None:
    group = parser.add_argument_group(
        "model (each overrides the preset's; per-level values as in the authors' --nlayers 8,6,4,2: "
        "an int for every RG level, or one per level, comma-separated)"
    )
    helps = {
        "n_layers": "RNVP blocks per sublayer (the paper: 8,6,4,2)",
        "hidden": "width of the s/t networks' hidden layers (the paper: 512)",
        "n_res": "residual blocks per s/t network (the paper: 4)",
        "n_mlp": "hidden layers per residual block (the paper: 2)",
    }
    for name, _ in _PER_LEVEL_OPTIONS:
        group.add_argument("--" + name.replace("_", "-"), default=None, metavar="N[,N...]", help=helps[name])
    group.add_argument("--prior", choices=("laplace", "gaussian"), default=None, help="latent prior (the paper: laplace)")
    group.add_argument("--variant", choices=("paper", "authors"), default=None, help="the paper's sublayer order, or the authors' published code's model")
    group.add_argument("--init", choices=("torch", "authors"), default=None, help="initialisation of the s/t networks (default: the variant's)")
    group.add_argument("--dtype", choices=("float32", "float64"), default=None, help="dtype of the model and the data (default float32)")


def _per_level(flag: str, text: str, minimum: int):
    """``"4"`` -> 4, ``"8,6,4,2"`` -> [8, 6, 4, 2]; anything else is an InputError naming the flag and value."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"{flag} must be an int or comma-separated ints, one per RG level (e.g. 8,6,4,2), got {text!r}") from None
    if any(v < minimum for v in values):
        raise InputError(f"{flag} entries must be >= {minimum}, got {text!r}")
    return values[0] if len(values) == 1 else values


def _model_overrides(args) -> dict:
    """The RGFlow keyword arguments given on the command line."""
    model = {
        name: _per_level("--" + name.replace("_", "-"), getattr(args, name), minimum)
        for name, minimum in _PER_LEVEL_OPTIONS
        if getattr(args, name) is not None
    }
    model.update({name: getattr(args, name) for name in ("prior", "variant", "init") if getattr(args, name) is not None})
    return model


def run_train(args: argparse.Namespace) -> int:
    from ..tools.checkpoint import read_document
    from ..tools.distributed import check_global_batch_size, context_from_environment, resolve_device
    from ..tools.files import run_lock
    from ..tools.presets import make_config, resume_config
    from ..tools.sampling import parse_temperature
    from ..tools.train import CHECKPOINT_NAME, check_output_folder, train

    context = context_from_environment()
    main_process = context.is_main
    device = args.device if args.device else None  # None: CUDA when available (cuda:LOCAL_RANK under torchrun)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # --sample-temperature T is --sample-temperatures T (argparse lets only one of them through).
    given = args.sample_temperatures if args.sample_temperature is None else [args.sample_temperature]
    temperatures = None if given is None else [parse_temperature(t) for t in given]
    out = Path(args.out) if args.out else Path("runs") / (args.preset or "cpu")
    # With --resume, settings left out come from the run being continued (its checkpoint).
    saved = None
    if args.resume and (out / CHECKPOINT_NAME).is_file():
        saved = read_document(out / CHECKPOINT_NAME).get("info", {}).get("train_config")
    if saved is not None and args.preset is not None and args.preset != saved.get("preset"):
        raise InputError(
            f"--preset {args.preset} differs from the preset of the run in {out} ({saved.get('preset')!r}); "
            "--resume continues that run with its own settings: drop --preset"
        )
    settings = dict(
        model=_model_overrides(args),
        data=args.data,
        data_root=args.data_root,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        decay_steps=args.decay_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.clip_norm,
        hflip=args.hflip or None,
        dtype=args.dtype,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        bf16=args.bf16 or None,
        compile=args.compile or None,
        cuda_graphs=args.cuda_graphs or None,
        activation_checkpointing=args.activation_checkpointing or None,
        device=device,
        seed=args.seed,
        train_size=args.train_size,
        test_size=args.test_size,
        sample_temperatures=temperatures,
    )
    config = resume_config(saved, **settings) if saved is not None else make_config(args.preset or "cpu", **settings)
    preset = config.preset or "cpu"
    if main_process and preset.startswith("paper") and torch.device(device or default_device()).type == "cpu":
        print(f"warning: preset {preset!r} is the paper-size model; on the CPU it is very slow (use --preset cpu)", file=sys.stderr)
    time_limit = None if args.time_limit is None else 60 * args.time_limit
    if not main_process:
        train(config, out, resume=args.resume, overwrite=args.overwrite, progress=False, time_limit=time_limit)
        return 0
    # The checks train() makes before it touches the folder, first: a refused set-up writes nothing.
    resolve_device(config.device, context)
    check_global_batch_size(config.batch_size, context.world_size)
    # The folder's lock covers the pictures written after training too (train() takes it again).
    with run_lock(check_output_folder(out)):
        return _train_and_write(args, config, out, time_limit)


def _train_and_write(args, config, out: Path, time_limit) -> int:
    from ..tools.evaluation import quality_kind, sample_quality
    from ..tools.plots import plot_history, save_image_grid
    from ..tools.quality import format_quality, msds_quality
    from ..tools.sampling import write_sample_groups
    from ..tools.train import load_images, train

    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, time_limit=time_limit)
    temperatures = config.sample_temperatures
    model = result.model
    kind = quality_kind(config.data, (model.channels, model.image_size, model.image_size))
    reference = None
    if kind is not None:  # the data's quality score, beside the samples' (in bpd.png and printed)
        reference = msds_quality(load_images(config.data, root=config.data_root, split="test", size=FINAL_QUALITY_SAMPLES, progress=False), kind)
    plot_history(result.history, out / "bpd.png", title=f"{config.data}, preset {config.preset or 'cpu'}", reference=reference)
    write_sample_groups(result.model, out / "samples.png", temperatures, num=args.num_samples, seed=config.seed, progress=not args.no_progress)
    # The training data beside the samples, so a person can compare them at a glance.
    data = load_images(config.data, root=config.data_root, split="train", size=args.num_samples, progress=False)
    save_image_grid(data, out / "data.png", scale=2)  # the scale of samples.png
    first, last = result.history[0], result.history[-1]
    print(f"wrote {result.checkpoint}, {out / 'history.json'}, {out / 'bpd.png'}, {out / 'samples.png'}, {out / 'data.png'}")
    if kind is not None:
        scores = sample_quality(result.model, kind, temperatures, num=FINAL_QUALITY_SAMPLES)
        print(f"MSDS{kind} quality score of {FINAL_QUALITY_SAMPLES} images (rgkern.tools.quality):")
        print(f"  {'data (test split)':<22} {format_quality(reference)}")
        for label, score in scores.items():
            print(f"  {'samples, T=' + label:<22} {format_quality(score)}")
    print(
        f"held-out bits/dim: {first['test_bpd']:.4f} at step {first['step']} -> {last['test_bpd']:.4f} at step {last['step']} "
        f"({len(result.history)} evaluations, {result.seconds:.0f} s)"
    )
    print(f"final held-out bits/dim: {last['test_bpd']:.4f}")
    return 0


# ----------------------------------------------------------------------------- sample
def _add_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="draw images from a checkpoint (PNG grid and/or .npz)",
        description="Sample images from a trained model. Each --out path ending in .png gets a grid of the "
        "first --grid-size images; one ending in .npz gets all images as uint8 'images' (N, C, L, L).",
    )
    add_checkpoint_option(parser)
    parser.add_argument("--num", type=positive_int, default=64, help="number of images (default 64)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images decoded at once (default 256)")
    parser.add_argument("--temperature", default="1.0", help="a float, or one per RG level, comma-separated (e.g. 0.2,0.6,0.6,0.6)")
    parser.add_argument("--out", required=True, nargs="+", help="output path(s): .png and/or .npz")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the latents, 0 .. 2**63 - 1 (default 0)")
    parser.add_argument("--grid-size", type=positive_int, default=64, help="images in the PNG grid (default 64)")
    parser.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: square)")
    parser.add_argument("--scale", type=positive_int, default=2, help="pixel scale of the PNG grid (default 2; the grid is at most 8192 x 8192 pixels)")
    parser.add_argument(
        "--allow-nonfinite", action="store_true",
        help="write images whose decode gave NaN or inf (NaN pixels become 0) and report their indices, instead of stopping with an error",
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the s/t networks (coupling arithmetic stays float32)")
    add_speed_options(parser, "decoder")
    add_common_options(parser)
    parser.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from ..tools.checkpoint import load_model
    from ..tools.sampling import check_writable, parse_temperature, write_samples

    device = setup_runtime(args)
    temperature = parse_temperature(args.temperature)
    png = [p for p in args.out if p.lower().endswith(".png")]
    npz = [p for p in args.out if p.lower().endswith(".npz")]
    other = [p for p in args.out if p not in png + npz]
    if other or len(png) > 1 or len(npz) > 1:
        raise InputError(f"--out takes at most one .png and one .npz path, got {args.out}")
    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise InputError(f"--cuda-graphs needs a CUDA device, got --device {device}; drop it (--compile works on the CPU)")
    for path in png + npz:  # before loading the model or sampling anything
        check_writable(path)
    model = load_model(checkpoint_path(args.checkpoint), device=device)
    result = write_samples(
        model, num=args.num, png=png[0] if png else None, npz=npz[0] if npz else None, batch_size=args.batch_size,
        temperature=temperature, seed=args.seed, grid_size=args.grid_size, nrow=args.nrow, scale=args.scale,
        progress=not args.no_progress, compile=args.compile, cuda_graphs=args.cuda_graphs, bf16=args.bf16,
        allow_nonfinite=args.allow_nonfinite,
    )
    bad = result["nonfinite"]
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        print(f"rgkern sample: warning: {len(bad)} of {result['num']} images hold NaN or inf (written with those pixels 0): index {shown}", file=sys.stderr)
    for key in ("png", "npz"):
        if result[key] is not None:
            print(f"wrote {result[key]}")
    return 0


# ----------------------------------------------------------------------------- evaluate
def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="held-out bits/dim of a checkpoint",
        description="Bits/dim of a checkpoint on a dataset split, with the deterministic dequantisation "
        "noise used during training (rgkern.tools.evaluation.evaluate_bpd).",
    )
    add_checkpoint_option(parser)
    parser.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--test-size", type=positive_int, default=None, help="first N images (default: the size used in training, else all)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    add_common_options(parser)
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..tools.checkpoint import load_checkpoint
    from ..tools.evaluation import evaluate_bpd
    from ..tools.train import load_images

    device = setup_runtime(args)
    state = load_checkpoint(checkpoint_path(args.checkpoint), map_location=device)
    trained = state["info"].get("train_config", {})
    data = args.data or trained.get("data")
    if data is None:
        raise InputError("the checkpoint does not say which data it was trained on; pass --data")
    data_root = args.data_root if args.data_root is not None else (trained.get("data_root") if data == trained.get("data") else None)
    size = args.test_size or (trained.get("test_size") if args.split == "test" and data == trained.get("data") else None)
    images = load_images(data, data_root, args.split, size, progress=not args.no_progress)
    model = state["model"].to(device).eval()
    bpd = evaluate_bpd(model, images, args.batch_size, progress=not args.no_progress)
    print(f"{data} {args.split} ({len(images)} images), step {state['step']}: {bpd:.4f} bits/dim")
    print(f"held-out bits/dim: {bpd:.4f}")
    return 0

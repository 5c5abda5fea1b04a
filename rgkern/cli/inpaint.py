"""The ``inpaint`` subcommand: fill a corrupted central region of held-out images (appendix F)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.preprocess import postprocess, preprocess
from ..data import load_dataset
from ..locality.inpaint import central_known_mask, inpaint, psnr
from ..tools.checkpoint import load_model
from ..tools.files import atomic_write, run_lock
from ..tools.plots import save_image_grid
from .options import add_checkpoint_option, add_common_options, checkpoint_path, nonnegative_int, positive_int, seed, setup_runtime

__all__ = ["add_cli", "run_inpaint"]


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``inpaint`` subcommand to an ``argparse`` subparsers object.

    The handler is stored as ``func`` in the parsed namespace (``args.func(args)``, returns
    an exit code); it is :func:`run_inpaint`.
    """
    parser = subparsers.add_parser(
        "inpaint",
        help="fill a corrupted central region of held-out images (paper appendix F)",
        description=(
            "Corrupt a central square of held-out images, fill it by maximum likelihood over the "
            "latents of its inference cone (incremental) and over all latents (baseline), write a "
            "PNG grid (original | corrupted | filled | baseline per row) and the PSNR over the region."
        ),
    )
    add_checkpoint_option(parser)
    parser.add_argument("--data", default="msds1", help="dataset for rgkern.data.load_dataset (default msds1); its test split is used")
    parser.add_argument("--data-root", default=None, help="data folder (cifar10, folder); a cache folder for msds1/msds2")
    parser.add_argument("--num", type=positive_int, default=8, help="held-out images to inpaint (default 8)")
    parser.add_argument("--region-size", type=positive_int, default=10, help="edge of the central square to corrupt (default 10)")
    parser.add_argument("--steps", type=nonnegative_int, default=100, help="Adam steps (default 100)")
    parser.add_argument("--restarts", type=positive_int, default=8, help="random restarts per image (default 8)")
    parser.add_argument("--init-draws", type=positive_int, default=None, help="random draws screened to pick the restarts (default: --restarts)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the latents (default 0.05)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the initial draws, 0 .. 2**63 - 1 (default 0)")
    parser.add_argument("--out", default="inpaint_out", help="output folder for inpaint.png and inpaint.json (default inpaint_out)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="kernel backend (default auto)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the all-latents baseline")
    add_common_options(parser)
    parser.set_defaults(func=run_inpaint)
    return parser


def run_inpaint(args: argparse.Namespace) -> int:
    """Handler of the ``inpaint`` subcommand (see :func:`add_cli`); returns an exit code."""
    device = setup_runtime(args)
    checkpoint = checkpoint_path(args.checkpoint)
    model = load_model(checkpoint, device=device, backend=args.backend)
    dtype = next(model.parameters()).dtype
    dataset = load_dataset(args.data, root=args.data_root, split="test", size=args.num, seed=0, progress=not args.no_progress)
    originals = torch.stack([dataset[i] for i in range(min(args.num, len(dataset)))])
    if tuple(originals.shape[1:]) != (model.channels, model.image_size, model.image_size):
        raise InputError(
            f"dataset {args.data!r} has images of shape {tuple(originals.shape[1:])}, the model expects "
            f"{(model.channels, model.image_size, model.image_size)}"
        )
    known = central_known_mask(model.image_size, args.region_size)
    x, _ = preprocess(originals, dequantize=False, dtype=dtype)
    x = x.to(device)
    corrupted_model_space = torch.where(known.to(device), x, torch.zeros((), dtype=dtype, device=device))
    corrupted = originals.clone()
    marker = torch.tensor([255, 0, 0][: model.channels], dtype=torch.uint8)[:, None]
    corrupted[:, :, ~known] = marker

    out = Path(args.out)
    with run_lock(out):  # one command at a time works in the folder
        results = _fill(args, model, originals, corrupted_model_space, known, device)
        _write_results(args, out, checkpoint, originals, corrupted, results, model.image_size)
    return 0


def _fill(args, model, originals, corrupted_model_space, known, device) -> dict:
    """Run the cone and (unless skipped) the all-latents inpainting; their results by name."""
    # Adam's first construction imports torch._dynamo (seconds): pay it before timing anything.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    results = {}
    methods = [("cone", True)] + ([] if args.skip_baseline else [("all_latents", False)])
    for name, incremental in methods:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        start = time.perf_counter()
        result = inpaint(
            model, corrupted_model_space, known, steps=args.steps, restarts=args.restarts, lr=args.lr,
            generator=generator, progress=not args.no_progress, incremental=incremental,
            init_draws=args.init_draws, return_info=True,
        )
        seconds = time.perf_counter() - start
        bad = [b for b in range(len(originals)) if not bool(torch.isfinite(result.images[b]).all())]
        if bad:
            raise InputError(
                f"inpainting ({name}) gave NaN or inf in image(s) {bad[:10]}; nothing was written. The model failed "
                "numerically on them: try a lower --lr or fewer --steps"
            )
        filled = postprocess(result.images.cpu())
        values = psnr(filled, originals, ~known)
        results[name] = dict(
            images=filled,
            psnr=values.tolist(),
            mean_psnr=float(values.mean()),
            seconds=seconds,
            free_latents=int(result.free_latents[0]),
            patch_evals_per_step=int(result.patch_evals_per_step[0]),
            final_loss=result.losses.min(dim=1).values.tolist(),
        )
    return results


def _write_results(args, out: Path, checkpoint: Path, originals, corrupted, results: dict, image_size: int) -> None:
    """``out/inpaint.png`` and ``out/inpaint.json``, each written atomically."""
    rows = []
    for b in range(len(originals)):
        row = [originals[b], corrupted[b], results["cone"]["images"][b]]
        if "all_latents" in results:
            row.append(results["all_latents"]["images"][b])
        rows.append(row)
    save_image_grid(
        torch.stack([image for row in rows for image in row]), out / "inpaint.png",
        nrow=len(rows[0]), scale=max(1, 128 // image_size),
    )
    summary = {
        "checkpoint": str(checkpoint),
        "data": args.data,
        "num_images": len(originals),
        "region_size": args.region_size,
        "steps": args.steps,
        "restarts": args.restarts,
        "columns": ["original", "corrupted", "filled (cone)"] + (["baseline (all latents)"] if "all_latents" in results else []),
        "methods": {name: {k: v for k, v in r.items() if k != "images"} for name, r in results.items()},
    }
    text = json.dumps(summary, indent=1, allow_nan=False) + "\n"
    atomic_write(out / "inpaint.json", lambda tmp: Path(tmp).write_text(text))
    for name, r in results.items():
        print(
            f"{name:12s} PSNR over the {args.region_size}x{args.region_size} region: {r['mean_psnr']:.2f} dB "
            f"(free latents {r['free_latents']}, patch evaluations per step {r['patch_evals_per_step']}, "
            f"{r['seconds']:.1f} s)"
        )
    print(f"wrote {out / 'inpaint.png'} and {out / 'inpaint.json'}")

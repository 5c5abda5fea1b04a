"""``python -m rgkern import-authors FILE --out DIR``: an rgkern checkpoint from the authors' ``.state`` file."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import InputError
from ..core.priors import PRIORS

__all__ = ["add_cli", "run_import_authors"]


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import-authors",
        help="convert a checkpoint of the authors' RG-Flow code into an rgkern checkpoint",
        description=(
            "Read a <epoch>.state file written by the authors' training script (github hongyehu/RG-Flow, "
            "code/main.py), infer its architecture from the tensors (image size, channels, kernel size, "
            "blocks, hidden width, residual blocks, hidden layers, prior) and write OUT/model.safetensors "
            "holding the same function as an rgkern model with variant 'authors'. Its optimiser state is "
            "not converted."
        ),
    )
    parser.add_argument("file", help="the authors' .state file")
    parser.add_argument("--out", required=True, help="output folder for model.safetensors")
    parser.add_argument("--prior", choices=tuple(PRIORS), default=None,
                        help="the prior (default: read from the file's prior.scale)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.safetensors")
    parser.set_defaults(func=run_import_authors)
    return parser


def run_import_authors(args: argparse.Namespace) -> int:
    from ..tools.authors_checkpoint import load_authors_checkpoint
    from ..tools.checkpoint import save_checkpoint
    from ..tools.files import run_lock

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a run folder (the model is written as OUT/model.safetensors)")
    target = out / "model.safetensors"
    overrides = {} if args.prior is None else {"prior": args.prior}
    model = load_authors_checkpoint(args.file, **overrides)  # checked before the folder is touched
    with run_lock(out):  # one command at a time writes into a run folder (a training there is refused)
        if target.exists() and not args.overwrite:
            raise InputError(f"{target} exists; pass --overwrite to replace it")
        save_checkpoint(target, model, info={"imported_from": str(Path(args.file).resolve())})
    config = ", ".join(f"{k}={v}" for k, v in model.config.items())
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {target}: {params:,} parameters, {config}")
    return 0

"""``python -m rgkern profile``: kernels, host syncs, FLOPs and bytes per pass, with a roofline estimate."""
from __future__ import annotations

import argparse

from .options import positive_int

__all__ = ["add_cli", "run_profile"]


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile",
        help="count kernels, host syncs, FLOPs and bytes of each pass and estimate GPU time",
        description=(
            "Count, on the CPU, what each pass of the paper's model (n_layers 8,6,4,2, hidden 512, n_res 4, "
            "n_mlp 2, 32x32x3) issues: kernels (GEMM, Triton, other), host synchronisations, matrix FLOPs and "
            "bytes moved, and print a Markdown table with a roofline estimate on a named GPU. Counting the "
            "paper-size model takes about a minute per backend on two cores."
        ),
    )
    parser.add_argument("--backend", choices=("torch", "triton", "both"), default="torch",
                        help="the path to count (triton runs the kernels in Triton's interpreter without a GPU)")
    parser.add_argument("--gpu", choices=("h100", "h200"), default="h200", help="device of the roofline estimate")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch of the FLOP and byte figures (default 64)")
    parser.add_argument("--hidden", type=positive_int, default=512,
                        help="hidden width (kernel counts do not depend on it; FLOPs and bytes do)")
    parser.set_defaults(func=run_profile)
    return parser


def run_profile(args: argparse.Namespace) -> int:
    backends = ("torch", "triton") if args.backend == "both" else (args.backend,)
    if "triton" in backends:
        import torch

        from ..core.ops import require_triton

        require_triton("cuda" if torch.cuda.is_available() else "cpu", "--backend triton")
    from ..tools.profile import GPUS, PAPER_STRUCTURE, format_table, profile_passes

    config = dict(PAPER_STRUCTURE, hidden=args.hidden)
    rows = profile_passes(config, batch=args.batch_size, backends=backends)
    print(format_table(rows, GPUS[args.gpu], args.batch_size))
    return 0

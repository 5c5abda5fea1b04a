"""Options and helpers shared by the subcommands: argparse types, device/threads, checkpoint paths."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = [
    "default_device",
    "positive_float",
    "positive_int",
    "add_speed_options",
    "add_common_options",
    "setup_runtime",
    "add_checkpoint_option",
    "checkpoint_path",
]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_speed_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--compile", action="store_true", help=f"torch.compile the {what} (fullgraph; the first steps are slow while it compiles)")
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help=f"torch.compile the {what} with mode='reduce-overhead', capturing CUDA graphs (CUDA only; implies --compile)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup_runtime(args) -> str:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args.device or default_device()


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (required): a checkpoint file or a run folder; read it with :func:`checkpoint_path`."""
    parser.add_argument("--checkpoint", required=True, help="a model.safetensors file, or a run folder holding one")


def checkpoint_path(text: str) -> Path:
    """A checkpoint file, or a run folder holding ``model.safetensors``."""
    from ..tools.train import CHECKPOINT_NAME

    path = Path(text)
    return path / CHECKPOINT_NAME if path.is_dir() else path


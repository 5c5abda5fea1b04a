"""Options and helpers shared by the subcommands: argparse types, device/threads, checkpoint paths.

Every argparse type here raises ``argparse.ArgumentTypeError`` with a message naming the
value and what was expected, which the parser prints as one line
``rgkern <command>: error: argument --name: ...`` (exit code 2).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

__all__ = [
    "default_device",
    "positive_float",
    "positive_int",
    "nonnegative_int",
    "seed",
    "device",
    "threads",
    "max_threads",
    "temperature",
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


#: The largest integer option value accepted (counts, sizes, steps): 2**62, so that no
#: option overflows the 64-bit integers torch and numpy compute with.
MAX_INT = 2**62


def _bounded_int(text: str, minimum: int, what: str, maximum: int = MAX_INT, limit: str = "at most 2**62") -> int:
    """``int(text)`` in ``minimum .. maximum``, else an error saying ``what`` was expected (and ``limit`` when out of range)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum or value > maximum:
        raise argparse.ArgumentTypeError(f"expected {what} ({limit}), got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _bounded_int(text, 0, "an integer >= 0")


def seed(text: str) -> int:
    """A seed: an integer in ``0 .. 2**63 - 1`` (what torch's generators and the trainer take)."""
    from ..tools.sampling import MAX_SEED

    return _bounded_int(text, 0, "an integer seed in 0 .. 2**63 - 1", MAX_SEED, str(MAX_SEED))


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has; anything else is refused with the reason."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        if parsed.index not in (None, 0):
            raise argparse.ArgumentTypeError(f"device {text!r}: the CPU has no index; use cpu")
        return "cpu"
    if parsed.type != "cuda":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported: rgkern runs on cpu, cuda or cuda:N")
    count = torch.cuda.device_count()
    if count == 0:
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available on this machine ({build}); use --device cpu")
    if parsed.index is not None and parsed.index >= count:
        raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    return str(parsed)


def max_threads() -> int:
    """The cap of ``--threads``: the CPUs this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads(text: str) -> int:
    """A thread count in ``1 .. max_threads()`` (more threads than CPUs only slow torch down)."""
    cap = max_threads()
    return _bounded_int(text, 1, f"a number of threads in 1 .. {cap}", cap, "the CPUs this process may use")


def temperature(text: str) -> float | list[float]:
    """A temperature or one per RG level (``0.2,0.6,0.6,0.6``); the model checks levels and range."""
    from ..core.errors import InputError
    from ..tools.sampling import parse_temperature

    try:
        return parse_temperature(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=threads, default=None, help=f"CPU threads for torch, 1 .. the CPUs available ({max_threads()} here; default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup_runtime(args: argparse.Namespace) -> str:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args.device or default_device()


def add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (required): a checkpoint file or a run folder; read it with :func:`checkpoint_path`."""
    parser.add_argument(
        "--checkpoint", required=True,
        help="a model.safetensors file, a run folder holding one, or pretrained:NAME, a model shipped with rgkern (pretrained:msds1-cpu)",
    )


def checkpoint_path(text: str) -> Path:
    """A checkpoint file, a run folder holding ``model.safetensors``, or ``pretrained:NAME`` (the shipped file; InputError for an unknown name)."""
    from ..tools.checkpoint import PRETRAINED_PREFIX, pretrained_path
    from ..tools.train import CHECKPOINT_NAME

    if text.startswith(PRETRAINED_PREFIX):
        return pretrained_path(text)
    path = Path(text)
    if not path.is_dir() or (path.suffix == ".safetensors" and not (path / CHECKPOINT_NAME).exists()):
        return path  # a file, a missing path or a folder named like a checkpoint: loading says which
    return path / CHECKPOINT_NAME

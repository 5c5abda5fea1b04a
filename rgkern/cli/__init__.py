"""Command line: ``python -m rgkern train | sample | evaluate | ...``.

One module per command group: :mod:`rgkern.cli.train` (``train``, ``sample``,
``evaluate``), :mod:`rgkern.cli.inpaint` and :mod:`rgkern.cli.explain`; the options they
share are in :mod:`rgkern.cli.options`. Only this package uses argparse.

Subcommands from other modules: every module named in :data:`EXTENSION_MODULES` that exists
is imported and its ``add_cli(subparsers)`` called. ``add_cli`` adds its parsers to the
``argparse`` sub-parsers object and gives each a handler with
``parser.set_defaults(func=handler)``; ``handler(args)`` returns an exit code (``None``
means 0). A module that does not exist (yet) is skipped; an import error inside an existing
module is not hidden.

Errors raised for input the user can fix (:class:`rgkern.core.errors.InputError` and its
subclasses: bad arguments and settings, missing or unwritable files, a torchrun set-up this
machine cannot serve, a training run stopped by NaN/inf) are printed as one line
``rgkern <command>: error: ...`` on stderr, with exit code 2 (as for argparse's own usage
errors). Any other exception is a bug, or a problem rgkern does not diagnose, and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..core.errors import InputError
from . import train as train_commands

__all__ = ["main", "build_parser", "EXTENSION_MODULES"]

EXTENSION_MODULES = ("rgkern.cli.inpaint", "rgkern.cli.explain", "rgkern.cli.profile", "rgkern.cli.authors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgkern", description="RG-Flow: train, sample, evaluate and more.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_commands.add_cli(subparsers)
    for name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:
                continue  # not written yet
            raise
        add_cli = getattr(module, "add_cli", None)
        if add_cli is not None:
            add_cli(subparsers)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = args.func(args)
    except InputError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"rgkern {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rgkern {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)

"""Command line: ``python -m rgkern train | sample | evaluate | ...``.

One module per command group: :mod:`rgkern.cli.train` (``train``, ``sample``,
``evaluate``), :mod:`rgkern.cli.inpaint` and :mod:`rgkern.cli.explain`; the options they
share are in :mod:`rgkern.cli.options`. Only this package uses argparse.

Subcommands from other modules: every module named in :data:`EXTENSION_MODULES` is imported
and its ``add_cli(subparsers)`` called. ``add_cli`` adds its parsers to the ``argparse``
sub-parsers object and gives each a handler with ``parser.set_defaults(func=handler)``;
``handler(args)`` returns an exit code (``None`` means 0). Every listed module is required:
one that is missing, fails to import or has no ``add_cli`` raises, rather than its
commands silently going missing.

Errors raised for input the user can fix (:class:`rgkern.core.errors.InputError` and its
subclasses: bad arguments and settings, missing or unwritable files, a torchrun set-up this
machine cannot serve) are printed as one line ``rgkern <command>: error: ...`` on stderr,
with exit code 2 (as for argparse's own usage errors; argparse's usage block is left out,
``--help`` shows it). Running out of memory (a ``--batch-size`` or ``--num`` too large for
the machine) is reported the same way. A training run that diverges (a NaN or infinite loss
or gradient norm: :class:`rgkern.tools.trainer.DivergenceError`) is not bad input: it is
printed as one line ``rgkern train: training diverged: ...`` with exit code
:data:`DIVERGED_EXIT_CODE` (3). Any other exception is a bug, or a problem rgkern does not
diagnose, and keeps its traceback (exit code 1).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Sequence

from ..core.errors import InputError
from ..tools.trainer import DivergenceError
from . import train as train_commands

__all__ = ["main", "build_parser", "EXTENSION_MODULES", "Parser", "DIVERGED_EXIT_CODE"]

#: The exit code of a command whose training run diverged (:class:`rgkern.tools.trainer.DivergenceError`).
DIVERGED_EXIT_CODE = 3

EXTENSION_MODULES = ("rgkern.cli.inpaint", "rgkern.cli.explain", "rgkern.cli.profile", "rgkern.cli.import_authors")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line, ``PROG: error: ...``, exit code 2.

    The subcommand parsers are of this class too (argparse makes them of the parent's), so
    ``PROG`` is ``rgkern train``, ``rgkern sample``, ...
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rgkern", description="RG-Flow: train, sample, evaluate and more.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = subparsers  # its .choices: the command names
    train_commands.add_cli(subparsers)
    for name in EXTENSION_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage or input error, 3 training diverged, 130 interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's name, as its own errors are
        prog = f"rgkern {args.command}" if getattr(args, "command", None) else "rgkern"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)\n")
    if getattr(args, "func", None) is None:
        commands = ", ".join(parser.commands.choices)
        print(f"rgkern: error: a command is required: one of {commands} (see rgkern --help)", file=sys.stderr)
        return 2
    try:
        code = args.func(args)
    except InputError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"rgkern {args.command}: error: {message}", file=sys.stderr)
        return 2
    except DivergenceError as error:
        print(f"rgkern {args.command}: training diverged: {' '.join(str(error).split())}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except (RuntimeError, MemoryError) as error:
        if not _out_of_memory(error):
            raise
        lines = [line for line in str(error).splitlines() if line.strip()]
        detail = lines[0] if lines else type(error).__name__
        detail = detail.split("DefaultCPUAllocator: ")[-1]  # drop the C++ assertion prefix
        print(
            f"rgkern {args.command}: error: out of memory ({' '.join(detail.split())}); "
            "use a smaller --batch-size (or fewer images)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"rgkern {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)

"""The ``prima-sim`` command line: a thin layer over the library.

Each subcommand lives in its own module under :mod:`prima_sim.cli` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (called with the parsed
arguments; returns the exit status). Errors a user can cause are :class:`~prima_sim.errors.PrimaSimError`
subclasses: they are printed as one line on stderr and end the program with their exit code, never with a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from prima_sim import __version__
from prima_sim.errors import PrimaSimError, one_line

# Subcommand modules, in the order `prima-sim --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "model_info",
    "profile",
    "netprobe",
    "plan",
    "simulate",
    "sweep",
    "shard",
    "worker",
    "run",
    "serve",
    "chat",
    "synth_model",
    "emulate",
    "report",
    "schema",
    "init",
    "cache",
)


def build_parser(commands: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The argument parser with ``commands`` (default: all; subcommands whose module is not present are skipped)."""
    parser = argparse.ArgumentParser(
        prog="prima-sim",
        description="Plan, simulate and really run LLM inference across the heterogeneous devices of a home.",
    )
    parser.add_argument("--version", action="version", version=f"prima-sim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands:
        try:
            module = importlib.import_module(f"prima_sim.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prima_sim.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


class _NoteHandler(logging.Handler):
    """Prints the library's notes (``prima_sim.notes``) as ``prima-sim COMMAND: note: ...`` on stderr."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.INFO)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        print(f"prima-sim {self.command}: note: {one_line(record.getMessage())}", file=sys.stderr)


def _show_notes(command: str) -> None:
    log = logging.getLogger("prima_sim.notes")
    log.handlers[:] = [_NoteHandler(command)]
    log.setLevel(logging.INFO)
    log.propagate = False


def _commands_for(argv: Sequence[str]) -> Sequence[str]:
    """The subcommand modules to import for ``argv``: only the named command's when it names one (every module
    imports its own dependencies: a worker process then holds no planner, simulator or GGUF reader; measured
    in docs/exec.md), else all of them (for the top-level help and the error that lists them)."""
    module = argv[0].replace("-", "_") if argv and "_" not in argv[0] else ""
    return (module,) if module in COMMAND_MODULES else COMMAND_MODULES


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prima-sim`` console script."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_commands_for(args_in))
    args = parser.parse_args(args_in)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _show_notes(args.command)
    try:
        return int(args.func(args) or 0)
    except PrimaSimError as exc:
        print(f"prima-sim {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"prima-sim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

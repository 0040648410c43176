"""Command line: thin parsing over functions the tests call directly.

Every sub-command registers itself (:func:`ablate.cli.core.command`) in the module of its kind:
``grids`` (run, prepare, expand, status, cancel), ``results`` (table, agree, plot, report),
``bench``, ``admin`` (variants, db, study, weights). Heavy imports stay inside the commands, so
``ablate table`` never loads torch.

Exit codes: 0 ok, 1 some cells failed, 2 bad input (grid, override, variant, path, database).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import admin, bench, grids, results
from .core import COMMANDS, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, BadInput, database_options

MODULES = (grids, results, bench, admin)  # importing each registers its commands

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "BadInput", "build_parser", "main"]

ORDER = ("run", "prepare", "table", "agree", "plot", "report", "variants", "status", "bench", "cancel", "db",
         "expand", "study", "weights")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``ablate`` parser; ``only``: give that command alone its options (what :func:`main`
    runs; the others' option builders may import modules of their own, such as the executors)."""
    p = argparse.ArgumentParser(prog="ablate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    order = {name: i for i, name in enumerate(ORDER)}
    for cmd in sorted(COMMANDS.values(), key=lambda c: order.get(c.name, len(order))):
        sp = sub.add_parser(cmd.name, help=cmd.help)
        if only is None or cmd.name == only:
            cmd.arguments(sp)
            if cmd.database:
                database_options(sp)
        sp.set_defaults(fn=cmd.run)
    return p


# the user's input errors besides BadInput (one line, exit 2), by module: a module not imported
# raised none of them, and importing it just to test for them (pydantic's models for the config)
# would slow every command that never needs it (``ablate table``)
_INPUT_ERRORS = (("ablate.config", "ConfigError"), ("ablate.db.engine", "DBError"))


def _bad_input(exc: BaseException) -> bool:
    return isinstance(exc, BadInput) or any(
        isinstance(exc, getattr(sys.modules[mod], name)) for mod, name in _INPUT_ERRORS if mod in sys.modules)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)  # the command (no top-level option takes a value)
    args = build_parser(first if first in COMMANDS else None).parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `ablate expand GRID | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except Exception as exc:
        if not _bad_input(exc):
            raise
        print(f"ablate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

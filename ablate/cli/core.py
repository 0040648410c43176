"""What every sub-command shares: the exit codes, :class:`BadInput`, the results folder, the
one way to open the results database, and the registry that sub-commands add themselves to."""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Raised by commands for input errors; printed as one line, exit 2."""


@dataclass
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    database: bool  # takes --db and --results


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None,
            database: bool = True) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated ``fn(args) -> exit code`` as ``ablate NAME``; ``arguments(parser)``
    adds its options; ``database``: it also takes ``--db`` and ``--results``."""
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, help, arguments, fn, database)
        return fn

    return register


def database_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--db", help="SQLAlchemy URL (default: $ABLATE_DB_URL or sqlite:///<results>/ablate.db)")
    sp.add_argument("--results", help="results folder (default: $ABLATE_RESULTS or ./results)")


def results_dir(arg: Optional[str]) -> Path:
    """The results folder (``--results``, else ``$ABLATE_RESULTS``, else ``./results``), created."""
    path = Path(arg or os.environ.get("ABLATE_RESULTS", "results"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--results: cannot create results folder {path}: {exc.strerror}; pass a writable --results")
    if not os.access(path, os.W_OK):
        raise BadInput(f"--results: results folder {path} is not writable; pass a writable --results")
    return path


@contextlib.contextmanager
def database(args: argparse.Namespace, create: bool = False, grid: Optional[str] = None,
             grid_option: str = "--grid") -> Iterator:
    """The results database of ``--db``/``--results``, closed on the way out. ``create``: make
    it (and its schema) when missing, else an absent database is bad input. ``grid``: must be a
    grid the database knows (named ``grid_option`` in the error)."""
    from ..db import open_db

    db = open_db(args.db, results_dir(args.results), create=create)
    try:
        _known_grid(grid, grid_option, db.grids)
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def reader(args: argparse.Namespace, grid: Optional[str] = None, grid_option: str = "--grid") -> Iterator:
    """:func:`database` for commands that only read: an :class:`ablate.db.read.Reader` of
    ``--db``/``--results`` (one read transaction; a SQLite file without SQLAlchemy)."""
    from ..db.read import reading

    with reading(args.db, results_dir(args.results)) as r:
        _known_grid(grid, grid_option, r.grids)
        yield r


def _known_grid(grid: Optional[str], grid_option: str, grids: Callable[[], list[str]]) -> None:
    if grid and grid not in (known := grids()):
        raise BadInput(f"{grid_option}: no grid named {grid!r} in the database; known grids: "
                       f"{', '.join(known) or '(none yet)'}")


def names(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """Repeatable, comma-separable option values (``--metrics a,b --metrics c``) as one list."""
    if not values:
        return None
    return [v.strip() for part in values for v in part.split(",") if v.strip()]


def grid_shape(text: str) -> tuple[int, int]:
    """``HxW`` (an argparse type)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 4x4; got {text!r}")
    return h, w


def executor_option(sp: argparse.ArgumentParser, what: str = "jobs") -> None:
    from ..launch import EXECUTORS

    sp.add_argument("--executor", choices=list(EXECUTORS),
                    help=f"where {what} run (default: the grid's launcher; auto = slurm if sbatch is on PATH)")


def override_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a setting, e.g. --set train.steps=50 (repeatable)")

"""The other commands: variants, db, study, weights."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .core import (EXIT_FAILED, EXIT_OK, BadInput, command, database, executor_option, results_dir)


@command("variants", "list registered variants",
         lambda v: v.add_argument("-v", "--verbose", action="store_true", help="also show hyperparameter defaults"),
         database=False)
def cmd_variants(args: argparse.Namespace) -> int:
    from ..registry import load_registry

    reg = load_registry()
    for name in sorted(reg.variants):
        cls = reg.variants[name]
        print(f"{name:24s} {cls.family:12s} {cls.description}")
        if args.verbose:
            defaults = cls.Config().model_dump(mode="json")
            print(f"{'':24s} params: {defaults}  (from {reg.origins[name]})")
    for origin, err in reg.errors.items():
        print(f"skipped plugin {origin}: {err}", file=sys.stderr)
    return EXIT_OK


@command("db", "the results database's schema: upgrade it, or show its revision",
         lambda d: d.add_argument("action", choices=["upgrade", "current"]))
def cmd_db(args: argparse.Namespace) -> int:
    """``ablate db upgrade``: migrate the schema to the newest revision (never drops data);
    ``ablate db current``: print the revision."""
    from ..db import Database, resolve_url, schema

    url = resolve_url(args.db, Path(args.results or os.environ.get("ABLATE_RESULTS", "results")))
    if args.action == "upgrade" and url.startswith("sqlite") and args.results:
        results_dir(args.results)
    db = Database(url, create=False)  # not `database()`: this is the one command that may meet an old schema
    try:
        if args.action == "upgrade":
            before, after = schema.upgrade(db.engine)
            print(f"{db!r}: schema {before or '(empty)'} -> {after}" if before != after
                  else f"{db!r}: schema already at {after}")
        else:
            with db.read() as conn:
                rev = schema.current_revision(conn)
            print(f"{db!r}: schema {rev or '(empty)'} (this ablate: {schema.HEAD})")
    finally:
        db.close()
    return EXIT_OK


def _study_args(st: argparse.ArgumentParser) -> None:
    st.add_argument("target", metavar="FILE|show", help="a study YAML file (e.g. grids/study.yaml), or `show`")
    st.add_argument("name", nargs="?", metavar="NAME", help="with show: the study's name")
    budget = st.add_mutually_exclusive_group()
    budget.add_argument("--trials", type=int, help="the budget: finished (complete + pruned) trials "
                                                   "(default: the file's `trials`)")
    budget.add_argument("--more", type=int, metavar="N", help="raise the study's budget by N trials")
    st.add_argument("--workers", type=int, help="K workers optimising at once (default: the file's launcher.jobs)")
    executor_option(st, "workers")
    st.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a base setting (pins a searched key) or launcher.*; repeatable")
    st.add_argument("--no-plots", action="store_true", help="show: print only, write no plots")


@command("study", "Optuna study: `study FILE` runs trials up to the budget; "
                  "`study show NAME` prints the best trial, importances and plots", _study_args)
def cmd_study(args: argparse.Namespace) -> int:
    """``ablate study FILE``: create or continue an Optuna study and run trials up to its budget;
    ``ablate study show NAME``: best trial or Pareto front, importances, trials, plots."""
    from .. import launch
    from ..db import resolve_url
    from ..grid import Cell, Grid, check_inputs
    from ..study import load_study_file, run_study, show

    if args.target == "show":
        if not args.name:
            raise BadInput("study show: give the study's name, e.g. `ablate study show mamba-study`")
        with database(args) as db:
            show(db, args.name, None if args.no_plots else results_dir(args.results) / "plots" / f"study_{args.name}")
        return EXIT_OK
    if args.name:
        raise BadInput(f"study: unexpected argument {args.name!r} (usage: ablate study FILE [options] | "
                       "ablate study show NAME)")
    for opt in ("trials", "more", "workers"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise BadInput(f"--{opt}: must be at least 1, got {getattr(args, opt)}")
    cfg = load_study_file(Path(args.target), tuple(args.set or ()))
    if args.trials is None and args.more is None and cfg.file.trials is None:
        raise BadInput(f"{cfg.source}: trials: no budget; give `trials: N` in the file or --trials N")
    try:
        kind = launch.resolve(args.executor or cfg.file.launcher.executor)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    url = resolve_url(args.db, Path(args.results or os.environ.get("ABLATE_RESULTS", "results")))
    if kind == "slurm" and url.startswith("sqlite"):
        raise BadInput("--db: Slurm workers run on other nodes and share the study through the database; "
                       "SQLite cannot be shared that way (file locks fail on network filesystems), so pass "
                       "a server database, e.g. --db postgresql+psycopg://user@host/ablate")
    first = cfg.spec_for(cfg.first_params())
    check_inputs(Grid(cfg.name, cfg.source, first, [Cell("", first, {})], cfg.file.launcher))
    with database(args, create=True) as db:
        report = run_study(cfg, db, results_dir(args.results), executor=kind, workers=args.workers,
                           trials=args.trials, more=args.more)
        print()
        show(db, cfg.name, None)
        print(f"(plots: ablate study show {cfg.name}; table: ablate table --study {cfg.name})")
    return EXIT_OK if report.ok else EXIT_FAILED


def _weights_args(w: argparse.ArgumentParser) -> None:
    from ..weights import add_arguments

    add_arguments(w)


@command("weights", "download pretrained weights the standard metrics and tokenizers use "
                    "(the only command that downloads)", _weights_args, database=False)
def cmd_weights(args: argparse.Namespace) -> int:
    from ..weights import cmd_fetch

    return cmd_fetch(args)

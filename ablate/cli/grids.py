"""Grid commands: run, prepare, expand, status, cancel."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import (EXIT_FAILED, EXIT_OK, command, database, executor_option, override_option,
                   results_dir)


def _run_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("grid", help="grid YAML file, e.g. grids/quickstart.yaml")
    executor_option(r)
    r.add_argument("--lost-after", type=float, metavar="SECONDS",
                   help="a running cell with no heartbeat for this long is lost and resumed "
                        "(default: the grid's launcher.lost_after_s)")
    r.add_argument("--jobs", type=int, help="concurrent local jobs (default: the grid's launcher.jobs)")
    override_option(r)
    r.add_argument("--retry-failed", action="store_true", help="run cells that failed before again")
    r.add_argument("--rerun-stale", action="store_true",
                   help="retrain finished cells whose code fingerprint differs from the installed code's "
                        "(the old runs stay in the database as history, status superseded)")
    r.add_argument("--no-table", action="store_true", help="do not print the table at the end")


@command("run", "run every cell of a grid that is not done, then print the table", _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from ..grid import check_inputs, load_grid
    from ..prep_jobs import plan
    from ..report import write_results
    from ..scheduler import launch

    grid = load_grid(Path(args.grid), tuple(args.set or ()))
    check_inputs(grid)
    plan([c.spec for c in grid.cells])  # shards, model paths, sizes: bad input before anything is written
    results = results_dir(args.results)
    with database(args, create=True) as db:
        report = launch(grid, db, results, executor=args.executor, jobs=args.jobs,
                        retry_failed=args.retry_failed, lost_after_s=args.lost_after,
                        rerun_stale=args.rerun_stale)
        if not args.no_table:
            md = write_results(db, results / "RESULTS.md", grid.name)
            print()
            print(md, end="")
            print(f"(written to {results / 'RESULTS.md'})")
        for key, why in report.errors.items():
            print(f"  {key[:12]}: {why}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def _prepare_args(pr: argparse.ArgumentParser) -> None:
    pr.add_argument("grid")
    executor_option(pr)
    pr.add_argument("--jobs", type=int, help="concurrent local jobs (default: the grid's launcher.jobs)")
    pr.add_argument("--tasks", type=int, help="encode tasks (default: launcher.prepare_tasks, else one per "
                                              "job slot, 16 on Slurm)")
    override_option(pr)
    pr.add_argument("--dry-run", action="store_true",
                    help="check the grid, every shard path and model path; list the preparations; run nothing")


@command("prepare", "the shared preparation of a grid only: tokenizers, judges and the token store of "
                    "streaming data (encode tasks as a job array)", _prepare_args)
def cmd_prepare(args: argparse.Namespace) -> int:
    from .. import launch
    from ..grid import check_inputs, load_grid
    from ..prep_jobs import describe, encode_tasks, plan, run_preparation

    grid = load_grid(Path(args.grid), tuple(args.set or ()))
    check_inputs(grid)
    todo = plan([c.spec for c in grid.cells])  # every shard and model path checked here
    print(f"grid {grid.name}: {len(todo)} preparation(s) for {len(grid.cells)} cells")
    for line in describe(todo):
        print(f"  {line}")
    if args.dry_run:
        return EXIT_OK
    results = results_dir(args.results).resolve()
    kind = launch.resolve(args.executor or grid.launcher.executor)
    runner = launch.executor(kind, results / "submitit" / grid.name, grid.launcher, args.jobs)
    n_tasks = args.tasks or encode_tasks(kind, runner.slots, grid.launcher.prepare_tasks)
    failed = run_preparation(runner, [c.spec for c in grid.cells], results, launch.KINDS[kind].cpus(grid.launcher),
                             n_tasks, sys.stdout)
    for key, why in failed.items():
        print(f"  {key[:12]}: {why}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _expand_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("grid")
    e.add_argument("--set", action="append", metavar="KEY=VALUE")


@command("expand", "list a grid's cells and keys without running anything", _expand_args, database=False)
def cmd_expand(args: argparse.Namespace) -> int:
    from ..grid import load_grid

    grid = load_grid(Path(args.grid), tuple(args.set or ()))
    print(f"grid {grid.name}: {len(grid.cells)} cells")
    for c in grid.cells:
        hyper = ", ".join(f"{k}={v}" for k, v in c.overrides.items())
        print(f"  {c.key}  seed={c.seed}  {hyper}")
    return EXIT_OK


@command("status", "cells per status for each grid, and why failed cells failed",
         lambda s: s.add_argument("grid", nargs="?", help="only this grid"))
def cmd_status(args: argparse.Namespace) -> int:
    from ..db import STATUSES
    from ..report import load_runs
    from ..scheduler import stale_runs

    with database(args, grid=args.grid, grid_option="GRID") as db:
        grids = [args.grid] if args.grid else db.grids()
        if not grids:
            print("no grids in the database yet")
        for g in grids:
            runs = load_runs(db, g)
            counts = runs["status"].value_counts().to_dict()
            parts = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
            print(f"{g}: {len(runs)} cells: {parts}")
            for r in runs[runs["status"] == "failed"].itertuples():
                print(f"  failed {r.variant} seed={r.seed} {r.key[:12]}: {r.error}")
            _store_status(db, g, results_dir(args.results))
            stale = stale_runs(db, runs.loc[runs["status"] == "done", "key"].tolist())
            if stale:
                print(f"  {len(stale)} stale (done by code other than the installed; "
                      f"`ablate run GRID --rerun-stale` retrains them):")
                by_key = runs.set_index("key")
                for key, (was, now) in stale.items():
                    r = by_key.loc[key]
                    print(f"  stale {r['variant']} seed={r['seed']} {key[:12]}: {was or 'unknown code'} "
                          f"(installed: {now})")
    return EXIT_OK


def _store_status(db, grid: str, results: Path) -> None:  # noqa: ANN001
    """Token-store progress (finished shards per split) of the grid's streaming preparations."""
    from sqlalchemy import select

    from ..config import ConfigError, RunSpec
    from ..data.sources import STREAMING
    from ..db.models import GridRun, Run
    from ..prep_jobs import describe, plan

    with db.read() as conn:
        stored = conn.execute(select(Run.spec).join(GridRun, GridRun.run_id == Run.id)
                              .where(GridRun.grid == grid)).scalars().all()
    specs = [RunSpec.model_validate(s) for s in stored
             if isinstance(s, dict) and s.get("data", {}).get("name") in STREAMING]
    if not specs:
        return
    try:
        for line in describe(plan(specs), results):
            print(f"  store {line}")
    except (ConfigError, OSError) as exc:  # shards moved since the run: say so, keep the rest
        print(f"  store: cannot read the shards: {exc}")


@command("cancel", "cancel a grid's pending and running cells and stop their jobs",
         lambda c: c.add_argument("grid"))
def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a grid: its pending and running cells become ``cancelled`` (the next ``ablate
    run`` resumes them) and their jobs are stopped, each by its executor (``scancel`` on Slurm,
    a kill for local jobs of this host)."""
    from .. import launch

    with database(args, grid=args.grid, grid_option="GRID") as db:
        rows = db.cancel(args.grid, "cancelled by `ablate cancel`")
        jobs = []
        for key, status, job_id in rows:
            run = db.run(key) if job_id else None
            jobs.append(launch.JobRef(key, status, job_id, run.host if run is not None else None))
        stopped = launch.cancel(jobs)
    print(f"grid {args.grid}: {len(rows)} cell(s) cancelled, {stopped} job(s) stopped; "
          f"`ablate run` resumes them")
    return EXIT_OK

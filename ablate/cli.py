"""Command line: thin parsing over functions the tests call directly.

Exit codes: 0 ok, 1 some cells failed, 2 bad input (grid, override, variant, path, database).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError
from .db import DBError
from .weights import add_commands as add_weights_commands

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Raised by commands for input errors; printed as one line, exit 2."""


def _results_dir(arg: Optional[str]) -> Path:
    path = Path(arg or os.environ.get("ABLATE_RESULTS", "results"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--results: cannot create results folder {path}: {exc.strerror}; pass a writable --results")
    if not os.access(path, os.W_OK):
        raise BadInput(f"--results: results folder {path} is not writable; pass a writable --results")
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from .db import open_db
    from .grid import check_inputs, load_grid
    from .prep_jobs import plan
    from .report import write_results
    from .scheduler import launch

    grid = load_grid(Path(args.grid), tuple(args.set or ()))
    check_inputs(grid)
    plan([c.spec for c in grid.cells])  # shards, model paths, sizes: bad input before anything is written
    results = _results_dir(args.results)
    db = open_db(args.db, results)
    try:
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
    finally:
        db.close()
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_prepare(args: argparse.Namespace) -> int:
    from .grid import check_inputs, load_grid
    from .prep_jobs import describe, encode_tasks, plan, run_preparation
    from .scheduler import _Runner, resolve_executor

    grid = load_grid(Path(args.grid), tuple(args.set or ()))
    check_inputs(grid)
    todo = plan([c.spec for c in grid.cells])  # every shard and model path checked here
    print(f"grid {grid.name}: {len(todo)} preparation(s) for {len(grid.cells)} cells")
    for line in describe(todo):
        print(f"  {line}")
    if args.dry_run:
        return EXIT_OK
    results = _results_dir(args.results).resolve()
    kind = resolve_executor(args.executor or grid.launcher.executor)
    slots = 1 if kind == "debug" else (args.jobs or grid.launcher.jobs)
    cpus = grid.launcher.slurm.cpus_per_job if kind == "slurm" else grid.launcher.cpus_per_job
    runner = _Runner(kind, results / "submitit" / grid.name, grid.launcher, slots, None)
    n_tasks = args.tasks or encode_tasks(kind, runner.slots, grid.launcher.prepare_tasks)
    failed = run_preparation(runner, [c.spec for c in grid.cells], results, cpus, n_tasks, sys.stdout)
    for key, why in failed.items():
        print(f"  {key[:12]}: {why}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _names(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """Repeatable, comma-separable option values (``--metrics a,b --metrics c``) as one list."""
    if not values:
        return None
    return [v.strip() for part in values for v in part.split(",") if v.strip()]


def _check_grid(db, grid: Optional[str]) -> None:  # noqa: ANN001
    if grid and grid not in db.grids():
        known = ", ".join(db.grids()) or "(none yet)"
        raise BadInput(f"--grid: no grid named {grid!r} in the database; known grids: {known}")


def cmd_table(args: argparse.Namespace) -> int:
    """The table from the database alone; markdown also rewrites RESULTS.md (or ``--out``)."""
    from .db import open_db
    from .report import build_table, render, write_results
    from .utils import atomic_write_bytes

    results = _results_dir(args.results)
    db = open_db(args.db, results, create=False)
    try:
        _check_grid(db, args.grid)
        options = dict(study=args.study, metrics=_names(args.metrics), group_by=_names(args.group_by),
                       sort=args.sort, baseline=args.baseline, include_superseded=args.include_superseded)
        try:
            table = build_table(db, args.grid, **options)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if args.format == "markdown":
            out = write_results(db, Path(args.out) if args.out else results / "RESULTS.md", args.grid,
                                table=table, **options)
        else:
            out = render(table, args.format)
            if args.out:
                atomic_write_bytes(Path(args.out), out.encode())
        print(out, end="")
    finally:
        db.close()
    return EXIT_OK


def cmd_agree(args: argparse.Namespace) -> int:
    """Spearman agreement of two metrics over a grid's configurations."""
    from .db import open_db
    from .report.agree import agreement, format_agreement

    db = open_db(args.db, _results_dir(args.results), create=False)
    try:
        _check_grid(db, args.grid)
        try:
            res = agreement(db, args.grid, args.metric_a, args.metric_b)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        print(format_agreement(res, args.grid, args.metric_a, args.metric_b), end="")
    finally:
        db.close()
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    """Loss curves, metric bars, the Pareto plot and sample sheets from the database (PNG + SVG)."""
    from .db import open_db
    from .report.plots import plot_all

    results = _results_dir(args.results)
    db = open_db(args.db, results, create=False)
    try:
        _check_grid(db, args.grid)
        out = Path(args.out) if args.out else results / "plots" / (args.grid or "all")
        try:
            written = plot_all(db, out, grid=args.grid, study=args.study, metrics=_names(args.metrics),
                               pareto_axes=(args.pareto_metric, args.pareto_cost))
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        for path in written:
            print(path)
        if not written:
            print("nothing to plot yet: no finished runs", file=sys.stderr)
    finally:
        db.close()
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """The HTML report: one folder (``index.html``, its scripts, data and images) to open offline."""
    import re

    from .db import open_db
    from .report.site import write_report

    if args.grid and args.study:
        raise BadInput("--grid and --study: give one (a study's runs are its own pseudo-grid)")
    results = _results_dir(args.results)
    db = open_db(args.db, results, create=False)
    try:
        _check_grid(db, args.grid)
        name = args.grid or (f"study_{args.study}" if args.study else "all")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "report"  # a folder name, never a path
        out = Path(args.out) if args.out else results / "report" / name
        roots = list(dict.fromkeys([Path.cwd(), results.resolve().parent, results.resolve()]))
        try:
            info = write_report(db, out, grid=args.grid, study=args.study, baseline=args.baseline,
                                pareto_axes=(args.pareto_metric, args.pareto_cost), roots=roots)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        except OSError as exc:
            raise BadInput(f"--out: cannot write the report to {out}: {exc.strerror or exc}") from None
    finally:
        db.close()
    print(f"{info.index}  ({info.rows} rows, {info.runs} runs, {info.images} images, "
          f"{info.bytes / 1e6:.1f} MB, {info.seconds:.1f} s)")
    if info.holes:
        print(f"{len(info.holes)} artifact file(s) missing, shown as holes: {info.holes[0]}"
              + (" ..." if len(info.holes) > 1 else ""), file=sys.stderr)
    return EXIT_OK


def cmd_variants(args: argparse.Namespace) -> int:
    from .registry import load_registry

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


def cmd_status(args: argparse.Namespace) -> int:
    from .db import STATUSES, open_db
    from .report import load_runs
    from .scheduler import stale_runs

    results = _results_dir(args.results)
    db = open_db(args.db, results, create=False)
    try:
        grids = [args.grid] if args.grid else db.grids()
        if args.grid and args.grid not in db.grids():
            raise BadInput(f"GRID: no grid named {args.grid!r}; known grids: {', '.join(db.grids()) or '(none)'}")
        if not grids:
            print("no grids in the database yet")
        for g in grids:
            runs = load_runs(db, g)
            counts = runs["status"].value_counts().to_dict()
            parts = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
            print(f"{g}: {len(runs)} cells: {parts}")
            for r in runs[runs["status"] == "failed"].itertuples():
                print(f"  failed {r.variant} seed={r.seed} {r.key[:12]}: {r.error}")
            _store_status(db, g, results)
            stale = stale_runs(db, runs.loc[runs["status"] == "done", "key"].tolist())
            if stale:
                print(f"  {len(stale)} stale (done by code other than the installed; "
                      f"`ablate run GRID --rerun-stale` retrains them):")
                by_key = runs.set_index("key")
                for key, (was, now) in stale.items():
                    r = by_key.loc[key]
                    print(f"  stale {r['variant']} seed={r['seed']} {key[:12]}: {was or 'unknown code'} "
                          f"(installed: {now})")
    finally:
        db.close()
    return EXIT_OK


def _store_status(db, grid: str, results: Path) -> None:  # noqa: ANN001
    """Token-store progress (finished shards per split) of the grid's streaming preparations."""
    from sqlalchemy import select

    from .config import RunSpec
    from .data.sources import STREAMING
    from .db.models import GridRun, Run
    from .prep_jobs import describe, plan

    with db.engine.connect() as conn:
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


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a grid: its pending and running cells become ``cancelled`` (the next ``ablate
    run`` resumes them) and their jobs are stopped: ``scancel`` on Slurm, a kill for local jobs
    of this host."""
    import signal
    import socket
    import subprocess

    from .db import open_db

    results = _results_dir(args.results)
    db = open_db(args.db, results, create=False)
    try:
        if args.grid not in db.grids():
            raise BadInput(f"GRID: no grid named {args.grid!r}; known grids: {', '.join(db.grids()) or '(none)'}")
        rows = db.cancel(args.grid, "cancelled by `ablate cancel`")
        host = socket.gethostname()
        slurm_ids, stopped = [], 0
        for key, status, job_id in rows:
            kind, _, jid = (job_id or "").partition(":")
            if kind == "slurm":
                slurm_ids.append(jid)
            elif kind == "local" and status == "running" and jid.isdigit():
                run = db.run(key)
                if run is not None and run.host == host:
                    try:
                        os.kill(int(jid), signal.SIGKILL)  # submitit's local jobs ignore SIGTERM
                        stopped += 1
                    except ProcessLookupError:
                        pass
        if slurm_ids:
            from shutil import which

            if which("scancel"):
                subprocess.run(["scancel", *sorted(set(slurm_ids))], capture_output=True, timeout=60)
                stopped += len(set(slurm_ids))
        print(f"grid {args.grid}: {len(rows)} cell(s) cancelled, {stopped} job(s) stopped; "
              f"`ablate run` resumes them")
    finally:
        db.close()
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    """``ablate db upgrade``: migrate the schema to the newest revision (never drops data);
    ``ablate db current``: print the revision."""
    from .db import Database, resolve_url, schema

    url = resolve_url(args.db, Path(args.results or os.environ.get("ABLATE_RESULTS", "results")))
    if args.action == "upgrade" and url.startswith("sqlite") and args.results:
        _results_dir(args.results)
    db = Database(url, create=False)
    try:
        if args.action == "upgrade":
            before, after = schema.upgrade(db.engine)
            print(f"{db!r}: schema {before or '(empty)'} -> {after}" if before != after
                  else f"{db!r}: schema already at {after}")
        else:
            with db.engine.connect() as conn:
                rev = schema.current_revision(conn)
            print(f"{db!r}: schema {rev or '(empty)'} (this ablate: {schema.HEAD})")
    finally:
        db.close()
    return EXIT_OK


def cmd_study(args: argparse.Namespace) -> int:
    """``ablate study FILE``: create or continue an Optuna study and run trials up to its budget;
    ``ablate study show NAME``: best trial or Pareto front, importances, trials, plots."""
    from .db import open_db, resolve_url
    from .grid import Cell, Grid, check_inputs
    from .scheduler import resolve_executor
    from .study import load_study_file, run_study, show

    if args.target == "show":
        if not args.name:
            raise BadInput("study show: give the study's name, e.g. `ablate study show mamba-study`")
        results = _results_dir(args.results)
        db = open_db(args.db, results, create=False)
        try:
            show(db, args.name, None if args.no_plots else results / "plots" / f"study_{args.name}")
        finally:
            db.close()
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
        kind = resolve_executor(args.executor or cfg.file.launcher.executor)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    url = resolve_url(args.db, Path(args.results or os.environ.get("ABLATE_RESULTS", "results")))
    if kind == "slurm" and url.startswith("sqlite"):
        raise BadInput("--db: Slurm workers run on other nodes and share the study through the database; "
                       "SQLite cannot be shared that way (file locks fail on network filesystems), so pass "
                       "a server database, e.g. --db postgresql+psycopg://user@host/ablate")
    first = cfg.spec_for(cfg.first_params())
    check_inputs(Grid(cfg.name, cfg.source, first, [Cell("", first, {})], cfg.file.launcher))
    results = _results_dir(args.results)
    db = open_db(args.db, results)
    try:
        report = run_study(cfg, db, results, executor=kind, workers=args.workers, trials=args.trials,
                           more=args.more)
        print()
        show(db, cfg.name, None)
        print(f"(plots: ablate study show {cfg.name}; table: ablate table --study {cfg.name})")
    finally:
        db.close()
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_expand(args: argparse.Namespace) -> int:
    from .grid import load_grid

    grid = load_grid(Path(args.grid), tuple(args.set or ()))
    print(f"grid {grid.name}: {len(grid.cells)} cells")
    for c in grid.cells:
        hyper = ", ".join(f"{k}={v}" for k, v in c.overrides.items())
        print(f"  {c.key}  seed={c.seed}  {hyper}")
    return EXIT_OK


def _grid_shape(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 4x4; got {text!r}")
    return h, w


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device: cuda requested but torch sees no CUDA device; use --device cpu")
    return name


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite, print its table, store its rows in the results database."""
    if args.suite == "table":
        return _bench_table(args)
    if args.suite == "data":
        return _bench_data(args)
    if args.suite == "report":
        return _bench_report(args)
    import torch

    from .db import open_db
    from .jobs import code_revision
    from .ops import bench

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    db = None
    if not args.no_store:  # open (and check) the database before spending minutes measuring
        db = open_db(args.db, _results_dir(args.results))
    try:
        if args.suite == "ops":
            rows = bench.bench_ops(lengths=args.lengths, batch=args.batch, d_inner=args.d_inner,
                                   n=args.d_state, repeats=args.repeats, impls=args.impls,
                                   device=device)
            table = bench.format_rows(rows)
        elif args.suite == "layers":
            from . import bench_layers as bl
            from .registry import UnknownVariant, load_registry

            try:
                for v in args.variants or ():
                    load_registry().get(v)
            except UnknownVariant as exc:
                raise BadInput(f"--variants: {str(exc).split(': ', 1)[1]}") from None
            cells = bl.cells_from_grid(Path(args.grid)) if args.grid else None
            if cells and args.variants:
                cells = [c for c in cells if c["variant"] in args.variants]
            rows = bl.bench_layers(args.variants, width=args.width, depth=args.depth, heads=args.heads,
                                   grid=args.tokens, text_len=args.text_len, batch=args.batch,
                                   passes=args.passes, warmup=args.warmup, device=device, cells=cells)
            table = bl.format_rows(rows)
        else:
            from .registry import UnknownVariant, load_registry

            reg = load_registry()
            for v in args.variants:
                try:
                    reg.get(v)
                except UnknownVariant as exc:
                    raise BadInput(f"--variants: {str(exc).split(': ', 1)[1]}") from None
            rows = bench.bench_steps(args.variants, batch=args.batch, width=args.width,
                                     depth=args.depth, grid=args.grid, text_len=args.text_len,
                                     codebook_size=args.codebook, repeats=args.repeats, device=device,
                                     precisions=args.precision, compile=args.compile)
            table = bench.format_steps(rows)
        where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        print(f"ablate bench {args.suite} ({where})")
        print(table)
        if db is not None:
            session = db.record_bench(args.suite, rows, device=where, code_rev=code_revision())
            print(f"(stored as bench {args.suite} session {session[:12]} in {db!r})")
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    finally:
        torch.set_num_threads(threads_before)
        if db is not None:
            db.close()
    return EXIT_OK


def _cpu_bench(args: argparse.Namespace, suite: str, measure, format_rows) -> int:  # noqa: ANN001
    """A suite that sets up its own work: open (and check) the database unless ``--no-store``,
    run ``measure()`` (its rows), print them with ``format_rows``, store them."""
    import platform

    from .db import open_db

    db = None if args.no_store else open_db(args.db, _results_dir(args.results))
    try:
        try:
            rows = measure()
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        where = f"cpu, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
        print(f"ablate bench {suite} ({where})")
        print(format_rows(rows))
        if db is not None:
            from .jobs import code_revision

            session = db.record_bench(suite, rows, device=where, code_rev=code_revision())
            print(f"(stored as bench {suite} session {session[:12]} in {db!r})")
    finally:
        if db is not None:
            db.close()
    return EXIT_OK


def _bench_table(args: argparse.Namespace) -> int:
    """``ablate bench table``: build a large database, time ``ablate table`` on it (torch-free)."""
    from .bench_table import bench_table, format_rows

    return _cpu_bench(args, "table", lambda: bench_table(runs=args.runs, n_metrics=args.metrics, repeats=args.repeats,
                                                         fmt=args.format, subprocess_runs=not args.no_subprocess),
                      format_rows)


def _bench_report(args: argparse.Namespace) -> int:
    """``ablate bench report``: build a large database, time ``ablate report`` and its page in Chromium."""
    from .bench_report import bench_report, format_rows

    return _cpu_bench(args, "report", lambda: bench_report(
        runs=args.runs, repeats=args.repeats, one_config_per_run=args.one_config_per_run,
        browser=not args.no_browser, subprocess_run=not args.no_subprocess), format_rows)


def _bench_data(args: argparse.Namespace) -> int:
    """``ablate bench data``: preparation throughput, training data wait, memory vs store size."""
    from .bench_data import bench_data, format_rows

    return _cpu_bench(args, "data", lambda: bench_data(images=args.images, image_size=args.image_size,
                                                       small=args.small, big=args.big, steps=args.steps,
                                                       batch=args.batch), format_rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--db", help="SQLAlchemy URL (default: $ABLATE_DB_URL or sqlite:///<results>/ablate.db)")
        sp.add_argument("--results", help="results folder (default: $ABLATE_RESULTS or ./results)")

    r = sub.add_parser("run", help="run every cell of a grid that is not done, then print the table")
    r.add_argument("grid", help="grid YAML file, e.g. grids/quickstart.yaml")
    r.add_argument("--executor", choices=["local", "slurm", "debug", "auto"],
                   help="where jobs run (default: the grid's launcher; auto = slurm if sbatch is on PATH)")
    r.add_argument("--lost-after", type=float, metavar="SECONDS",
                   help="a running cell with no heartbeat for this long is lost and resumed "
                        "(default: the grid's launcher.lost_after_s)")
    r.add_argument("--jobs", type=int, help="concurrent local jobs (default: the grid's launcher.jobs)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.steps=50 (repeatable)")
    r.add_argument("--retry-failed", action="store_true", help="run cells that failed before again")
    r.add_argument("--rerun-stale", action="store_true",
                   help="retrain finished cells whose code fingerprint differs from the installed code's "
                        "(the old runs stay in the database as history, status superseded)")
    r.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    common(r)
    r.set_defaults(fn=cmd_run)

    pr = sub.add_parser("prepare", help="the shared preparation of a grid only: tokenizers, judges and the "
                                        "token store of streaming data (encode tasks as a job array)")
    pr.add_argument("grid")
    pr.add_argument("--executor", choices=["local", "slurm", "debug", "auto"],
                    help="where jobs run (default: the grid's launcher)")
    pr.add_argument("--jobs", type=int, help="concurrent local jobs (default: the grid's launcher.jobs)")
    pr.add_argument("--tasks", type=int, help="encode tasks (default: launcher.prepare_tasks, else one per "
                                              "job slot, 16 on Slurm)")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (repeatable)")
    pr.add_argument("--dry-run", action="store_true",
                    help="check the grid, every shard path and model path; list the preparations; run nothing")
    common(pr)
    pr.set_defaults(fn=cmd_prepare)

    t = sub.add_parser("table", help="regenerate the results table from the database")
    t.add_argument("--format", choices=["markdown", "csv", "latex", "html", "json"], default="markdown",
                   help="markdown also rewrites <results>/RESULTS.md; csv gives mean, std, n and the 95%% "
                        "interval per metric")
    t.add_argument("--grid", help="only this grid's runs")
    t.add_argument("--study", help="only this study's runs")
    t.add_argument("--metrics", action="append", metavar="NAME[,NAME]",
                   help="metric columns, in order (default: the standard ones present)")
    t.add_argument("--group-by", action="append", metavar="KEY[,KEY]",
                   help="row keys besides the variant, pooling the configurations that share them: spec keys "
                        "such as model.params.scan or scan, seed, hyper (default: one row per configuration "
                        "and code version)")
    t.add_argument("--sort", metavar="KEY", help="a metric (best first) or a column; --sort=-KEY reverses")
    t.add_argument("--baseline", metavar="VARIANT|CONFIG",
                   help="add each row's difference to this row with its 95%% Welch interval (* where it "
                        "excludes 0): a variant with one configuration in the table, or a config key prefix")
    t.add_argument("--include-superseded", action="store_true",
                   help="also show superseded runs (old results of cells retrained with newer code)")
    t.add_argument("--out", help="write here (markdown: instead of <results>/RESULTS.md)")
    common(t)
    t.set_defaults(fn=cmd_table)

    ag = sub.add_parser("agree", help="does metric A rank a grid's configurations like metric B? "
                                      "(Spearman rho, bootstrap interval, permutation p)")
    ag.add_argument("grid", help="grid name")
    ag.add_argument("metric_a", help="e.g. clip_domain")
    ag.add_argument("metric_b", help="e.g. align_acc")
    common(ag)
    ag.set_defaults(fn=cmd_agree)

    pl = sub.add_parser("plot", help="loss curves, metric bars, Pareto plot and sample sheets (PNG + SVG)")
    pl.add_argument("--grid", help="only this grid's runs")
    pl.add_argument("--study", help="only this study's runs")
    pl.add_argument("--out", help="folder for the figures (default: <results>/plots/<grid or all>)")
    pl.add_argument("--metrics", action="append", metavar="NAME[,NAME]",
                    help="metrics of the bar charts (default: the standard ones present)")
    pl.add_argument("--pareto-metric", default="fid_domain", help="quality axis of the Pareto plot")
    pl.add_argument("--pareto-cost", default="train_tokens_per_s", help="throughput axis of the Pareto plot")
    common(pl)
    pl.set_defaults(fn=cmd_plot)

    rp = sub.add_parser("report", help="the results as an HTML report: one folder that opens offline in any browser")
    rp.add_argument("--grid", help="only this grid's runs")
    rp.add_argument("--study", help="an Optuna study's trials, with its history, importances and parallel coordinates")
    rp.add_argument("--out", help="the report's folder (default: <results>/report/<grid | study_NAME | all>); "
                                  "an earlier report there is replaced")
    rp.add_argument("--baseline", metavar="VARIANT|CONFIG",
                    help="add each row's difference to this row with its 95%% Welch interval, as `ablate table`")
    rp.add_argument("--pareto-metric", default="fid_domain", help="quality axis of the Pareto plot")
    rp.add_argument("--pareto-cost", default="train_tokens_per_s", help="throughput axis of the Pareto plot")
    common(rp)
    rp.set_defaults(fn=cmd_report)

    v = sub.add_parser("variants", help="list registered variants")
    v.add_argument("-v", "--verbose", action="store_true", help="also show hyperparameter defaults")
    v.set_defaults(fn=cmd_variants)

    s = sub.add_parser("status", help="cells per status for each grid, and why failed cells failed")
    s.add_argument("grid", nargs="?", help="only this grid")
    common(s)
    s.set_defaults(fn=cmd_status)

    b = sub.add_parser("bench", help="benchmarks: print a table and store it in the results database")
    bsub = b.add_subparsers(dest="suite", required=True, metavar="SUITE")
    bo = bsub.add_parser("ops", help="selective scan paths and text-dependent scans vs attention: "
                                     "forward+backward time and peak memory")
    bo.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], metavar="L")
    bo.add_argument("--batch", type=int, default=32)
    bo.add_argument("--d-inner", type=int, default=256, help="scan channels (2 x d_model)")
    bo.add_argument("--d-state", type=int, default=16)
    bo.add_argument("--repeats", type=int, default=3)
    bo.add_argument("--impls", nargs="+", help="ref torch numba cuda mambapy (default: what is available)")
    bs = bsub.add_parser("step", help="training-step time of whole generators, ratio to the first variant")
    bs.add_argument("--variants", nargs="+", default=["transformer", "mamba-prefix"])
    bs.add_argument("--batch", type=int, default=64)
    bs.add_argument("--width", type=int, default=96)
    bs.add_argument("--depth", type=int, default=4)
    bs.add_argument("--grid", type=_grid_shape, default=(4, 4), help="image token grid HxW")
    bs.add_argument("--text-len", type=int, default=10)
    bs.add_argument("--codebook", type=int, default=512)
    bs.add_argument("--repeats", type=int, default=5)
    bs.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                    help="autocast precisions to time, paired per variant (ratios to the first)")
    bs.add_argument("--compile", action="store_true", help="torch.compile every generator first")
    bl = bsub.add_parser("layers", help="the seed's speed table: full backbone forward, one layer, and "
                                        "the attention / SSM ops inside it, per variant")
    bl.add_argument("--variants", nargs="+", help="default: all registered (or the --grid file's)")
    bl.add_argument("--grid", help="grid YAML file: take its variants, their params, width, depth, heads, "
                                   "token grid and caption length")
    bl.add_argument("--batch", type=int, default=32)
    bl.add_argument("--width", type=int, default=96)
    bl.add_argument("--depth", type=int, default=4)
    bl.add_argument("--heads", type=int, default=4)
    bl.add_argument("--tokens", type=_grid_shape, default=(4, 4), help="image token grid HxW")
    bl.add_argument("--text-len", type=int, default=10)
    bl.add_argument("--passes", type=int, default=50, help="timed forward passes (mean reported)")
    bl.add_argument("--warmup", type=int, default=5)
    bt = bsub.add_parser("table", help="time `ablate table` on a fresh database of 10,000 runs x 20 metrics")
    bt.add_argument("--runs", type=int, default=10_000)
    bt.add_argument("--metrics", type=int, default=20)
    bt.add_argument("--repeats", type=int, default=3)
    bt.add_argument("--format", choices=["markdown", "csv", "latex", "html", "json"], default="markdown")
    bt.add_argument("--no-subprocess", action="store_true", help="time only the in-process table")
    bt.add_argument("--no-store", action="store_true", help="print only; do not write the database")
    common(bt)
    bt.set_defaults(fn=cmd_bench)
    bd = bsub.add_parser("data", help="token-store preparation images/s per core, training data wait, "
                                      "peak memory on a store of --big vs --small samples")
    bd.add_argument("--images", type=int, default=2000, help="images encoded for the throughput")
    bd.add_argument("--image-size", type=int, default=64)
    bd.add_argument("--small", type=int, default=10_000, help="samples of the small store")
    bd.add_argument("--big", type=int, default=1_000_000, help="samples of the big store")
    bd.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    bd.add_argument("--batch", type=int, default=64)
    bd.add_argument("--no-store", action="store_true", help="print only; do not write the database")
    common(bd)
    bd.set_defaults(fn=cmd_bench)
    br = bsub.add_parser("report", help="time `ablate report` on a fresh database of 10,000 runs with curves and "
                                        "images, and its index page in headless Chromium")
    br.add_argument("--runs", type=int, default=10_000)
    br.add_argument("--repeats", type=int, default=2)
    br.add_argument("--one-config-per-run", action="store_true",
                    help="every run its own configuration (10,000 table rows, a large study's shape)")
    br.add_argument("--no-browser", action="store_true", help="time only the build")
    br.add_argument("--no-subprocess", action="store_true", help="time only the in-process build")
    br.add_argument("--no-store", action="store_true", help="print only; do not write the database")
    common(br)
    br.set_defaults(fn=cmd_bench)
    for sp in (bo, bs, bl):
        sp.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
        sp.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
        sp.add_argument("--no-store", action="store_true", help="print only; do not write the database")
        common(sp)
        sp.set_defaults(fn=cmd_bench)

    c = sub.add_parser("cancel", help="cancel a grid's pending and running cells and stop their jobs")
    c.add_argument("grid")
    common(c)
    c.set_defaults(fn=cmd_cancel)

    d = sub.add_parser("db", help="the results database's schema: upgrade it, or show its revision")
    d.add_argument("action", choices=["upgrade", "current"])
    common(d)
    d.set_defaults(fn=cmd_db)

    e = sub.add_parser("expand", help="list a grid's cells and keys without running anything")
    e.add_argument("grid")
    e.add_argument("--set", action="append", metavar="KEY=VALUE")
    e.set_defaults(fn=cmd_expand)

    st = sub.add_parser("study", help="Optuna study: `study FILE` runs trials up to the budget; "
                                      "`study show NAME` prints the best trial, importances and plots")
    st.add_argument("target", metavar="FILE|show", help="a study YAML file (e.g. grids/study.yaml), or `show`")
    st.add_argument("name", nargs="?", metavar="NAME", help="with show: the study's name")
    budget = st.add_mutually_exclusive_group()
    budget.add_argument("--trials", type=int, help="the budget: finished (complete + pruned) trials "
                                                   "(default: the file's `trials`)")
    budget.add_argument("--more", type=int, metavar="N", help="raise the study's budget by N trials")
    st.add_argument("--workers", type=int, help="K workers optimising at once (default: the file's launcher.jobs)")
    st.add_argument("--executor", choices=["local", "slurm", "debug", "auto"],
                    help="where workers run (default: the file's launcher; slurm needs a server --db)")
    st.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a base setting (pins a searched key) or launcher.*; repeatable")
    st.add_argument("--no-plots", action="store_true", help="show: print only, write no plots")
    common(st)
    st.set_defaults(fn=cmd_study)
    add_weights_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DBError, BadInput) as exc:
        print(f"ablate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

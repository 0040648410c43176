"""Result commands: table, agree, plot, report (all read the database, none writes runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import EXIT_OK, BadInput, command, database, names, reader, results_dir


def _table_args(t: argparse.ArgumentParser) -> None:
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


@command("table", "regenerate the results table from the database", _table_args)
def cmd_table(args: argparse.Namespace) -> int:
    """The table from the database alone; markdown also rewrites RESULTS.md (or ``--out``). It
    reads in one read transaction and imports neither pandas nor numpy (:mod:`ablate.report.summary`)."""
    from ..report import render, write_results
    from ..report.summary import build
    from ..utils import atomic_write_bytes

    with reader(args, grid=args.grid) as db:
        options = dict(study=args.study, metrics=names(args.metrics), group_by=names(args.group_by),
                       sort=args.sort, baseline=args.baseline, include_superseded=args.include_superseded)
        try:
            table = build(db, args.grid, **options)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if args.format == "markdown":
            out = write_results(db, Path(args.out) if args.out else results_dir(args.results) / "RESULTS.md",
                                args.grid, table=table, **options)
        else:
            out = render(table, args.format)
            if args.out:
                atomic_write_bytes(Path(args.out), out.encode())
    print(out, end="")
    return EXIT_OK


def _agree_args(ag: argparse.ArgumentParser) -> None:
    ag.add_argument("grid", help="grid name")
    ag.add_argument("metric_a", help="e.g. clip_domain")
    ag.add_argument("metric_b", help="e.g. align_acc")


@command("agree", "does metric A rank a grid's configurations like metric B? "
                  "(Spearman rho, bootstrap interval, permutation p)", _agree_args)
def cmd_agree(args: argparse.Namespace) -> int:
    """Spearman agreement of two metrics over a grid's configurations."""
    from ..report.agree import agreement, format_agreement

    with database(args, grid=args.grid) as db:
        try:
            res = agreement(db, args.grid, args.metric_a, args.metric_b)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    print(format_agreement(res, args.grid, args.metric_a, args.metric_b), end="")
    return EXIT_OK


def _pareto_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pareto-metric", default="fid_domain", help="quality axis of the Pareto plot")
    p.add_argument("--pareto-cost", default="train_tokens_per_s", help="throughput axis of the Pareto plot")


def _plot_args(pl: argparse.ArgumentParser) -> None:
    pl.add_argument("--grid", help="only this grid's runs")
    pl.add_argument("--study", help="only this study's runs")
    pl.add_argument("--out", help="folder for the figures (default: <results>/plots/<grid or all>)")
    pl.add_argument("--metrics", action="append", metavar="NAME[,NAME]",
                    help="metrics of the bar charts (default: the standard ones present)")
    _pareto_options(pl)


@command("plot", "loss curves, metric bars, Pareto plot and sample sheets (PNG + SVG)", _plot_args)
def cmd_plot(args: argparse.Namespace) -> int:
    """Loss curves, metric bars, the Pareto plot and sample sheets from the database (PNG + SVG)."""
    from ..report.plots import plot_all

    with database(args, grid=args.grid) as db:
        out = Path(args.out) if args.out else results_dir(args.results) / "plots" / (args.grid or "all")
        try:
            written = plot_all(db, out, grid=args.grid, study=args.study, metrics=names(args.metrics),
                               pareto_axes=(args.pareto_metric, args.pareto_cost))
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    for path in written:
        print(path)
    if not written:
        print("nothing to plot yet: no finished runs", file=sys.stderr)
    return EXIT_OK


def _report_args(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--grid", help="only this grid's runs")
    rp.add_argument("--study", help="an Optuna study's trials, with its history, importances and parallel coordinates")
    rp.add_argument("--out", help="the report's folder (default: <results>/report/<grid | study_NAME | all>); "
                                  "an earlier report there is replaced")
    rp.add_argument("--baseline", metavar="VARIANT|CONFIG",
                    help="add each row's difference to this row with its 95%% Welch interval, as `ablate table`")
    _pareto_options(rp)


@command("report", "the results as an HTML report: one folder that opens offline in any browser", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    """The HTML report: one folder (``index.html``, its scripts, data and images) to open offline."""
    import re

    from ..report.site import write_report

    if args.grid and args.study:
        raise BadInput("--grid and --study: give one (a study's runs are its own pseudo-grid)")
    results = results_dir(args.results)
    with database(args, grid=args.grid) as db:
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
    print(f"{info.index}  ({info.rows} rows, {info.runs} runs, {info.images} images, "
          f"{info.bytes / 1e6:.1f} MB, {info.seconds:.1f} s)")
    if info.holes:
        print(f"{len(info.holes)} artifact file(s) missing, shown as holes: {info.holes[0]}"
              + (" ..." if len(info.holes) > 1 else ""), file=sys.stderr)
    return EXIT_OK

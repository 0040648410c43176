"""Figures from the results database (matplotlib, no pyplot state, PNG and SVG).

Each figure function returns a :class:`matplotlib.figure.Figure` (what the tests inspect);
:func:`plot_all` draws them all for a grid and writes ``<name>.png`` and ``<name>.svg``:

``loss_curves``   training and validation loss by step, one line per group: the mean over
                  seeds, with a band of ± one std where there are several seeds
``pareto``        a quality metric against throughput, one point per group (mean over seeds,
                  error bars ± std), the Pareto-optimal points joined and ringed
``metric_bars``   one panel per metric: a bar per group (mean), error bars ± std over seeds
``sample_sheet``  a grid of decoded samples: rows are the fixed prompts, columns the training
                  steps of one run per group (``sheet_<label>``), or the groups at the final step
                  (``sheet_final``); from the snapshots the jobs saved (``eval.sheet_prompts``)

A "group" is a row of the table: the seeds of one configuration (``config_key``) made by one
code version (``fingerprint``); runs of different configurations or code are never pooled in a
line, band, bar or point. Its label is the variant's name, followed by what sets the
configuration apart (the table's Hyperparameters text) when the variant has several, and by
the code when the configuration has several (:func:`group_labels`). Superseded runs (history of
retrained cells) are left out, as the table leaves them out.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..db import Database
from ..results import artifacts, curves, higher_is_better, load
from .table import FINISHED, METRIC_COLUMNS, config_hypers, config_specs, metric_column

__all__ = ["group_labels", "loss_curves", "metric_bars", "pareto", "pareto_front", "plot_all",
           "read_snapshots", "sample_sheet"]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def group_labels(runs: pd.DataFrame, specs: Optional[dict[str, dict]] = None, overrides: bool = False) -> pd.Series:
    """A label per run of :func:`ablate.results.load`'s frame, one per group (configuration and
    code version): the variant; ``variant (Hyperparameters)`` when the variant has several
    configurations here, named as the table names them (:func:`ablate.report.table.config_hypers`:
    the spec keys that differ, from ``specs`` ({config_key: flat spec}); with ``overrides`` also
    the ``hyper`` column; the config key's first digits wherever two texts would coincide); then
    `` [code abcd1234]`` (the fingerprint's first digits, ``unknown`` without one) when the
    configuration's runs come from several code versions. Equal ``hyper`` texts never merge two
    configurations: the label follows ``config_key``, not ``hyper``."""
    if runs.empty:
        return pd.Series([], index=runs.index, dtype=object)
    hypers = config_hypers(runs, specs, overrides)
    several = (runs.groupby("variant")["config_key"].transform("nunique") > 1).to_numpy()
    labels = pd.Series([f"{v} ({hypers[ck][0]})" if sev else v for v, ck, sev in
                        zip(runs["variant"], runs["config_key"], several)], index=runs.index, dtype=object)
    # code versions per configuration: of the runs that have a fingerprint or finished without one
    # (older code than fingerprints); a run not yet started has none and splits nothing
    code = runs["fingerprint"].astype(object).where(runs["fingerprint"].notna(), "unknown").str[:8]
    counted = runs["fingerprint"].notna() | runs["status"].isin(FINISHED)
    versions = code[counted].groupby(runs["config_key"][counted]).nunique()
    split = (runs["config_key"].map(versions).fillna(0) > 1).to_numpy()
    return labels.where(~split, labels + " [code " + code + "]")


def loss_curves(curve: pd.DataFrame, names: Sequence[str] = ("train_loss", "val_loss")):
    """One panel per curve name; per group a line of the mean over seeds at each step and a band
    of ± one std (only where more than one seed has the step). ``curve``: :func:`ablate.results.curves`
    with a ``label`` column (:func:`group_labels`)."""
    fig = _figure(5.0 * len(names), 3.6)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        sub = curve[curve["name"] == name]
        for i, (label, g) in enumerate(sub.groupby("label", sort=True)):
            stats = g.groupby("step")["value"].agg(["mean", "std", "count"]).reset_index()
            line, = ax.plot(stats["step"], stats["mean"], label=label, color=f"C{i % 10}")
            band = stats[stats["count"] > 1]
            if len(band):
                ax.fill_between(band["step"], band["mean"] - band["std"], band["mean"] + band["std"],
                                color=line.get_color(), alpha=0.2, linewidth=0, label=f"_{label} ± std")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def _group_means(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and std over the finished runs of each group: columns ``<m>``, ``<m>_std``, index label."""
    done = runs[runs["status"] == "done"]
    agg = done.groupby("label", sort=True)[list(metrics)].agg(["mean", "std"])
    out = pd.DataFrame(index=agg.index)
    for m in metrics:
        out[m], out[f"{m}_std"] = agg[(m, "mean")], agg[(m, "std")]
    return out


def pareto_front(x: np.ndarray, y: np.ndarray, x_higher: bool, y_higher: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (ties kept), sorted by x."""
    sx = np.asarray(x, float) * (1 if x_higher else -1)
    sy = np.asarray(y, float) * (1 if y_higher else -1)
    front = []
    for i in range(len(sx)):
        dominated = np.any((sx >= sx[i]) & (sy >= sy[i]) & ((sx > sx[i]) | (sy > sy[i])))
        if not dominated and np.isfinite(sx[i]) and np.isfinite(sy[i]):
            front.append(i)
    return sorted(front, key=lambda i: x[i])


def pareto(runs: pd.DataFrame, metric: str = "fid_domain", cost: str = "train_tokens_per_s"):
    """``metric`` (y) against ``cost`` (x; throughput, higher is better) per group, mean ± std
    over seeds; the Pareto front is a dashed line labelled "Pareto front" through ringed points.
    ``runs``: :func:`ablate.results.load` with a ``label`` column."""
    for m in (metric, cost):
        if m not in runs.columns:
            raise ValueError(f"--pareto: no final metric {m!r} in these runs")
    means = _group_means(runs, [metric, cost]).dropna(subset=[metric, cost])
    y_higher = bool(higher_is_better(metric))
    x_higher = higher_is_better(cost) is not False
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    for i, (label, r) in enumerate(means.iterrows()):
        ax.errorbar(r[cost], r[metric], xerr=np.nan_to_num(r[f"{cost}_std"]), yerr=np.nan_to_num(r[f"{metric}_std"]),
                    fmt="o", color=f"C{i % 10}", label=label, capsize=3)
    front = pareto_front(means[cost].to_numpy(), means[metric].to_numpy(), x_higher, y_higher)
    if front:
        fx, fy = means[cost].to_numpy()[front], means[metric].to_numpy()[front]
        ax.plot(fx, fy, "k--", linewidth=1, label="Pareto front")
        ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="k", label="_front points")
    ax.set_xlabel(metric_column(cost)[0])
    ax.set_ylabel(metric_column(metric)[0])
    ax.set_title(f"{metric} vs {cost} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if len(means):
        ax.legend(fontsize=7)
    fig.front = [str(means.index[i]) for i in front]  # what the dashed line joins, for callers and tests
    return fig


def metric_bars(runs: pd.DataFrame, metrics: Sequence[str]):
    """One panel per metric: a bar per group (mean over finished runs) with ± std error bars."""
    metrics = [m for m in metrics if m in runs.columns]
    means = _group_means(runs, metrics)
    ncols = min(3, max(1, len(metrics)))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = _figure(4.2 * ncols, 3.0 * nrows + 0.3 * len(means))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels = list(means.index)
    for ax, m in zip(axes, metrics):
        ax.bar(range(len(labels)), means[m].to_numpy(), yerr=np.nan_to_num(means[f"{m}_std"].to_numpy()),
               capsize=3, color=[f"C{i % 10}" for i in range(len(labels))], label=m)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric_column(m)[0])
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def read_snapshots(folder: Path) -> tuple[list[str], dict[int, np.ndarray]]:
    """A run's sample-sheet snapshots: (prompts, {step: uint8 [k, H, W, 3] tiles})."""
    from PIL import Image

    folder = Path(folder)
    meta = json.loads((folder / "prompts.json").read_text())
    (h, w), gap, k = meta["tile"], meta["gap"], len(meta["prompts"])
    steps = {}
    for png in sorted(folder.glob("step_*.png")):
        m = re.fullmatch(r"step_(\d+)\.png", png.name)
        if not m:
            continue
        strip = np.asarray(Image.open(png).convert("RGB"))
        steps[int(m.group(1))] = np.stack([strip[:h, i * (w + gap):i * (w + gap) + w] for i in range(k)])
    return meta["prompts"], steps


def sample_sheet(prompts: Sequence[str], columns: Sequence[tuple[str, np.ndarray]], title: str = ""):
    """Rows are ``prompts``, columns ``(title, tiles [k, H, W, 3])``: one image axes per
    prompt x column, the prompt as the row label, the column title above the first row."""
    k, n = len(prompts), len(columns)
    fig = _figure(2.6 + 1.1 * n, 0.5 + 1.1 * k)
    axes = fig.subplots(k, n, squeeze=False)
    for j, (col_title, tiles) in enumerate(columns):
        for i in range(k):
            ax = axes[i, j]
            ax.imshow(tiles[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_title, fontsize=8)
            if j == 0:
                ax.set_ylabel(prompts[i], rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "x"


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{name}.{ext}"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def plot_all(db: Database, out: Path, grid: Optional[str] = None, study: Optional[str] = None,
             metrics: Optional[Sequence[str]] = None,
             pareto_axes: tuple[str, str] = ("fid_domain", "train_tokens_per_s")) -> list[Path]:
    """Every figure of the grid's (or study's, or the whole database's) runs, as PNG and SVG
    under ``out``; returns the paths written. Figures whose data is missing (no curves yet, no
    throughput, no snapshots) are skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load(db, grid, study, spec=False)
    runs = runs[runs["status"] != "superseded"].reset_index(drop=True)
    if not (runs["status"] == "done").any():
        return []
    runs["label"] = group_labels(runs, config_specs(db, runs), overrides=grid is not None or study is not None)
    written: list[Path] = []
    curve = curves(db, grid, study, names=["train_loss", "val_loss"])
    if len(curve):
        curve = curve.merge(runs[["run_id", "label"]], on="run_id")
        written += _save(loss_curves(curve), out, "loss_curves")
    metric, cost = pareto_axes
    if metric in runs.columns and cost in runs.columns and runs[[metric, cost]].notna().all(axis=1).any():
        written += _save(pareto(runs, metric, cost), out, f"pareto_{metric}_vs_{cost}")
    missing = [m for m in metrics or () if m not in runs.columns]
    if missing:
        have = sorted(c for c in runs.columns if runs[c].dtype.kind == "f")
        raise ValueError(f"--metrics: no final metric {missing[0]!r} in these runs (present: {', '.join(have)})")
    bars = list(metrics) if metrics else [m for m, *_ in METRIC_COLUMNS if m in runs.columns
                                           and runs[m].notna().any()]
    if bars:
        written += _save(metric_bars(runs, bars), out, "metrics")
    written += _sheets(db, runs, out, grid, study)
    return written


def _sheets(db: Database, runs: pd.DataFrame, out: Path, grid: Optional[str], study: Optional[str]) -> list[Path]:
    """``sheet_<group>`` (prompts x steps) per group, from its finished run with the lowest seed,
    and ``sheet_final`` (prompts x groups at each one's last snapshot)."""
    arts = artifacts(db, grid, study, kind="sheet")
    arts = arts[arts["status"] == "done"].merge(runs[["run_id", "label"]], on="run_id")
    written: list[Path] = []
    finals: list[tuple[str, np.ndarray]] = []
    first_prompts: Optional[list[str]] = None
    for label, g in arts.sort_values(["label", "seed"]).groupby("label", sort=True):
        row = g.iloc[0]
        folder = Path(row["path"])
        if not (folder / "prompts.json").exists():
            continue
        prompts, steps = read_snapshots(folder)
        if not steps:
            continue
        cols = [(f"step {s}", tiles) for s, tiles in sorted(steps.items())]
        fig = sample_sheet(prompts, cols, f"{label}, seed {row['seed']}")
        written += _save(fig, out, f"sheet_{_slug(label)}")
        if first_prompts is None:
            first_prompts = prompts
        if prompts == first_prompts:  # the comparison needs the same prompts in every column
            last = max(steps)
            finals.append((f"{label}\nstep {last}", steps[last]))
    if finals:
        written += _save(sample_sheet(first_prompts, finals, "final step, per group"), out, "sheet_final")
    return written

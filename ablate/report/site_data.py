"""What the HTML report shows, gathered from the database as plain JSON-ready dicts.

:func:`collect` returns a :class:`SiteData`: the table exactly as ``ablate table`` builds and
words it (:func:`ablate.report.table.build_table`, :func:`ablate.report.render.display_table`:
the same cells, marks and baseline differences, never recomputed), with per column the numbers
the page sorts by; filter facets (the spec keys whose values differ between rows); per row
(:func:`ablate.report.table.row_members` says which runs are behind it) its loss curves as mean
and std over seeds per step, its configuration, its runs, and its image artifacts (sample-sheet
snapshots, final samples, failure cases) as files to copy; the Pareto plot's points and front.

Everything here is data: text from the database (captions, error messages, variant
descriptions, grid names) stays text, and the page inserts it as text only. Image files are
named by the run's key, never by anything a caption or a plugin wrote. A file that an artifact
names but that is gone is kept as a *hole* (its original path, ``src`` None): the page shows the
gap instead of failing.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ..db import Database, safe_url
from ..results import artifacts, curves, load, run_specs
from .render import _diff_metrics, display_table
from .naming import spec_text
from .table import build_table, metric_column, row_members

CURVES = ("train_loss", "val_loss")
FACET_VALUES = 60  # a key with more distinct values gets no drop-down (the text filter still finds it)
SAMPLE_COLS, SAMPLE_GAP = 8, 2  # ablate.train.save_sheet's layout of samples.png
_STEP = re.compile(r"step_(\d+)\.png")
_UNSET = object()


@dataclass
class SiteData:
    """The report's content. ``table``: what ``data/table.js`` holds (meta, columns, rows,
    facets, pareto, study, spec: the configuration entries every row shares); ``details``: one dict per table row (``data/rows/<i>.js``);
    ``copies``: ``{relative destination: source file path}`` of the images to put in the folder;
    ``holes``: artifact files named in the database but missing on disk; ``image_bytes``: the
    copies' total size; ``texts``: the lists of prompts and captions that ``prompts`` and
    ``captions`` in the details point into (``data/texts.js``)."""

    table: dict[str, Any]
    details: list[dict[str, Any]]
    copies: dict[str, str] = field(default_factory=dict)
    holes: list[str] = field(default_factory=list)
    image_bytes: int = 0
    texts: list[list[str]] = field(default_factory=list)


def _num(v: Any) -> Optional[float]:
    """A JSON number, or None for NaN / missing (JSON has no NaN)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def _slug(key: str) -> str:
    """A run key as a folder name (keys are hex; a superseded one carries ``@<id>``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80] or "run"


def _columns(table: pd.DataFrame, shown: pd.DataFrame) -> list[dict[str, Any]]:
    """Per displayed column: its title, kind (text | metric | diff), metric, direction."""
    attrs = table.attrs
    kinds: dict[str, tuple[str, Optional[str]]] = {}
    for m in attrs.get("metrics", []):
        kinds[metric_column(m)[0]] = ("metric", m)
    base = attrs.get("baseline")
    for m in _diff_metrics(attrs):
        kinds[f"Δ {metric_column(m)[0]} vs {base['label']}"] = ("diff", m)
    out = []
    for title in shown.columns:
        kind, m = kinds.get(title, ("text", None))
        hib = metric_column(m)[1] if m else None
        out.append({"title": title, "kind": kind, "metric": m, "higher": hib})
    return out


def _sort_values(bare: pd.DataFrame, columns: list[dict[str, Any]]) -> list[list[Any]]:
    """Per row, per column: the number a metric column sorts by (the mean; a diff column: the
    difference), None for text columns (the page sorts those by their text). ``bare``: the
    table without its attrs."""
    per_col = []
    for c in columns:
        if c["kind"] == "metric":
            per_col.append([_num(v) for v in bare[c["metric"]].to_numpy(float)])
        elif c["kind"] == "diff":
            per_col.append([_num(v) for v in bare[c["metric"] + "_diff"].to_numpy(float)])
        else:
            per_col.append([None] * len(bare))
    return [list(r) for r in zip(*per_col)] if per_col else []


def _facets(row_specs: list[dict[str, Any]], methods: Sequence[str]) -> tuple[list[dict], list[dict[str, str]]]:
    """``(facets, values per row)``: Method, then the spec keys that are hyperparameters of
    these rows: those taking two values or more within one variant's rows, and those every row
    sets that differ between rows (a variant's own parameter, set only on its rows, would just
    repeat the Method). A facet lists its values sorted; a key with more than
    :data:`FACET_VALUES` values gets none (the text filter still matches ``key=value``)."""
    keys = sorted(set().union(*row_specs)) if row_specs else []
    per_row: list[dict[str, str]] = [{"Method": m} for m in methods]
    facets = [{"key": "Method", "values": sorted(set(methods))}]
    for k in keys:
        if k == "model.variant":
            continue
        # on the raw values first (cheap): does it vary within a variant, or is it set everywhere?
        seen: dict[str, Any] = {}
        varies = unset = differs = False
        first = row_specs[0].get(k, _UNSET)
        for m, s in zip(methods, row_specs):
            v = s.get(k, _UNSET)
            unset |= v is _UNSET
            differs |= v != first
            w = seen.setdefault(m, v)
            if w is not v and w != v:
                varies = True
                break
        if not differs and not varies or not varies and unset:
            continue
        texts = [spec_text(s[k]) if k in s else "(unset)" for s in row_specs]
        distinct = set(texts)
        for r, t in zip(per_row, texts):
            r[k] = t
        if len(distinct) <= FACET_VALUES:
            facets.append({"key": k, "values": sorted(distinct, key=_natural)})
    return facets, per_row


def _common(row_specs: list[dict[str, Any]]) -> dict[str, Any]:
    """The spec entries every row shares (a 10,000-row report then stores them once)."""
    common = dict(row_specs[0]) if row_specs else {}
    for spec in row_specs[1:]:
        for k in [k for k, v in common.items() if k not in spec or spec[k] != v]:
            del common[k]
    return common


def _natural(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _curve_stats(curve: pd.DataFrame, row_of: dict[int, int]) -> dict[int, dict[str, dict[str, list]]]:
    """``{row: {curve name: {step, mean, std, n}}}``: per step the mean over the row's runs that
    have the step, the std (ddof=1) only where more than one has it (else None)."""
    if not len(curve):
        return {}
    c = curve[["run_id", "name", "step", "value"]].copy()
    c["row"] = c["run_id"].map(row_of)
    c = c.dropna(subset=["row"])
    stats = c.groupby(["row", "name", "step"], sort=True)["value"].agg(["mean", "std", "count"]).reset_index()
    rows, names = stats["row"].to_numpy(), stats["name"].to_numpy(object)
    steps, counts = stats["step"].to_numpy().tolist(), stats["count"].to_numpy().tolist()
    means = [_num(v) for v in stats["mean"].to_numpy(float)]
    stds = [_num(v) if n > 1 else None for v, n in zip(stats["std"].to_numpy(float), counts)]
    # the (row, name) blocks are contiguous after the sort: cut the columns at their edges, no
    # per-group frame (10,000 rows x 2 curves of pandas groups would take seconds)
    edges = np.flatnonzero((rows[1:] != rows[:-1]) | (names[1:] != names[:-1])) + 1
    out: dict[int, dict[str, dict[str, list]]] = {}
    for a, b in zip([0, *edges.tolist()], [*edges.tolist(), len(rows)]):
        out.setdefault(int(rows[a]), {})[str(names[a])] = {
            "step": [int(x) for x in steps[a:b]], "mean": means[a:b], "std": stds[a:b], "n": counts[a:b]}
    return out


def _resolve(path: str, roots: Sequence[str]) -> Optional[str]:
    """An artifact path as stored (absolute, or relative to where ``ablate run`` ran): the first
    existing of itself and itself under each of ``roots``; None where none exists. (Plain
    strings: pathlib's objects cost more than the file system here, 40,000 times over.)"""
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    for root in roots:
        full = os.path.join(root, path)
        if os.path.exists(full):
            return full
    return None


def expected_steps(spec: dict[str, Any]) -> set[int]:
    """The snapshot steps a finished run of ``spec`` (flat) took: ``eval.sheet_steps``, or every
    ``train.eval_every`` and the last (``ablate.train.Trainer.sheet_due``); empty when unknown."""
    steps, every, sheet = spec.get("train.steps"), spec.get("train.eval_every"), spec.get("eval.sheet_steps")
    if sheet:
        return {int(s) for s in sheet if isinstance(s, (int, float)) and s <= (steps or s)}
    if isinstance(steps, int) and isinstance(every, int) and every > 0:
        return set(range(every, steps + 1, every)) | {steps}
    return set()


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Images:
    """Collects the image files to copy and the holes. Copies are named
    ``img/<run key>.<what>.png`` (one folder: a report of 10,000 runs writes no folder per run)."""

    def __init__(self, roots: Sequence[Path]):
        self.roots, self.copies, self.holes, self.bytes = [str(r) for r in roots], {}, [], 0
        self.texts: dict[tuple[str, ...], int] = {}

    def text_list(self, texts: Sequence[str]) -> int:
        """The index of ``texts`` (prompts, captions) in the report's shared list of text lists:
        runs of one dataset share their prompts and captions, stored once (``data/texts.js``)."""
        return self.texts.setdefault(tuple(texts), len(self.texts))

    def add(self, source: Optional[str], dest: str, named: str) -> Optional[str]:
        """``dest`` (relative to the report) if ``source`` is a file, else None and a hole."""
        try:
            st = os.stat(source) if source else None
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            self.holes.append(named)
            return None
        self.copies[dest] = source
        self.bytes += st.st_size
        return dest

    def sheet(self, run_key: str, seed: int, path: str, expect: set[int]) -> dict[str, Any]:
        """A run's sample-sheet snapshots: prompts, tile, gap, and per step its image or hole."""
        folder = _resolve(path, self.roots)
        entry: dict[str, Any] = {"seed": seed, "key": run_key, "prompts": self.text_list([]), "tile": None, "gap": 2,
                                 "steps": []}
        try:
            names = os.listdir(folder) if folder is not None else []
            meta = _read_json(os.path.join(folder, "prompts.json")) if "prompts.json" in names else None
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            self.holes.append(os.path.join(path, "prompts.json"))
            entry["missing"] = str(path)
            return entry
        entry.update(prompts=self.text_list([str(p) for p in meta.get("prompts", [])]), tile=meta.get("tile"),
                     gap=int(meta.get("gap", 2)))
        found = {int(m.group(1)): n for n in names if (m := _STEP.fullmatch(n))}
        slug = _slug(run_key)
        for step in sorted(set(found) | expect):
            name = f"step_{step:06d}.png"
            src = self.add(os.path.join(folder, found[step]) if step in found else None,
                           f"img/{slug}.sheet.{step:06d}.png", os.path.join(path, name))
            entry["steps"].append({"step": step, "src": src, **({} if src else {"missing": os.path.join(path, name)})})
        return entry

    def samples(self, run_key: str, seed: int, path: str) -> dict[str, Any]:
        """A run's final samples (``samples.png``, 8 tiles a row) with their captions (``samples.txt``)."""
        src_path = _resolve(path, self.roots)
        src = self.add(src_path, f"img/{_slug(run_key)}.samples.png", path)
        captions: list[str] = []
        if src_path is not None:
            try:
                with open(os.path.splitext(src_path)[0] + ".txt", encoding="utf-8", errors="replace") as f:
                    captions = f.read().splitlines()
            except OSError:
                pass  # samples without their captions: the page shows the image whole
        return {"seed": seed, "key": run_key, "src": src, "cols": SAMPLE_COLS, "gap": SAMPLE_GAP,
                "captions": self.text_list(captions), **({} if src else {"missing": path})}

    def failures(self, run_key: str, seed: int, path: str) -> dict[str, Any]:
        """A run's failure cases: ``failures.json`` in the artifact folder, ``{"items": [{"file",
        "caption", "read"}]}``: the generated images the judge scored wrong, the caption each was
        made for, and what the judge read in it."""
        folder = _resolve(path, self.roots)
        entry: dict[str, Any] = {"seed": seed, "key": run_key, "items": []}
        try:
            meta = _read_json(os.path.join(folder, "failures.json")) if folder else None
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            self.holes.append(os.path.join(path, "failures.json"))
            entry["missing"] = str(path)
            return entry
        for i, item in enumerate(meta.get("items", [])):
            name = Path(str(item.get("file", ""))).name  # a name inside the folder, never a path out of it
            src = self.add(os.path.join(folder, name) if name else None, f"img/{_slug(run_key)}.failure.{i:04d}.png",
                           os.path.join(path, name))
            entry["items"].append({"src": src, "caption": str(item.get("caption", "")),
                                   "read": spec_text(item.get("read", "")),
                                   **({} if src else {"missing": os.path.join(path, name)})})
        return entry


def _pareto(bare: pd.DataFrame, metric: str, cost: str) -> dict[str, Any]:
    """Points (row means ± std over seeds of ``metric`` and ``cost``) and the Pareto front
    (:func:`ablate.report.plots.pareto_front`); ``reason`` instead when the table (``bare``:
    without its attrs) lacks them."""
    from .plots import pareto_front

    for m in (metric, cost):
        if m not in bare.columns:
            return {"reason": f"no {m} in these runs (choose others with --pareto-metric / --pareto-cost)"}
    x, y = bare[cost].to_numpy(float), bare[metric].to_numpy(float)
    ok = np.flatnonzero(~np.isnan(x) & ~np.isnan(y))
    if not len(ok):
        return {"reason": f"no row has both {metric} and {cost}"}
    y_higher = bool(metric_column(metric)[1])
    x_higher = metric_column(cost)[1] is not False
    front = [int(ok[i]) for i in pareto_front(x[ok], y[ok], x_higher, y_higher)]
    xs, ys = bare[f"{cost}_std"].to_numpy(float), bare[f"{metric}_std"].to_numpy(float)
    points = [{"row": int(i), "x": _num(x[i]), "y": _num(y[i]), "xerr": _num(xs[i]), "yerr": _num(ys[i])} for i in ok]
    return {"metric": metric, "cost": cost, "xlabel": metric_column(cost)[0], "ylabel": metric_column(metric)[0],
            "points": points, "front": front}


def collect(db: Database, grid: Optional[str] = None, study: Optional[str] = None,
            baseline: Optional[str] = None, pareto_axes: tuple[str, str] = ("fid_domain", "train_tokens_per_s"),
            roots: Sequence[Path] = (Path("."),), title: Optional[str] = None) -> SiteData:
    """Everything the report of ``grid`` / ``study`` (or the whole database) shows.

    ``roots``: folders that relative artifact paths may be relative to (where ``ablate run``
    ran; the results folder's parent). Raises ValueError (one line) for a bad ``baseline``,
    and when there is nothing to show (no runs at all)."""
    runs = load(db, grid, study, spec=False)
    runs = runs[runs["status"] != "superseded"].reset_index(drop=True)
    if not len(runs):
        where = f"grid {grid!r}" if grid else f"study {study!r}" if study else "the database"
        raise ValueError(f"nothing to report: {where} has no runs yet (`ablate run GRID` makes some)")
    # one spec per configuration (its first run's), for the table's Hyperparameters, the filter
    # facets and the row pages alike
    first = runs.groupby("config_key")["run_id"].min()
    by_run = run_specs(db, first.tolist())
    specs = {ck: by_run[rid] for ck, rid in first.items() if rid in by_run}
    table = build_table(db, grid, study=study, baseline=baseline, runs=runs, specs=specs)
    shown = display_table(table)
    columns = _columns(table, shown)
    members = row_members(runs, table)
    attrs = table.attrs
    marks: list[dict[str, str]] = [{} for _ in range(len(table))]
    titles = [c["title"] for c in columns]
    for kind, letter in (("best", "b"), ("tied", "t")):
        for m, positions in attrs.get(kind, {}).items():
            j = titles.index(metric_column(m)[0])
            for i in positions:
                marks[i][str(j)] = letter
    bare = table.copy(deep=False)
    bare.attrs = {}

    config_keys, fingerprints = list(bare["config_key"]), list(bare["fingerprint"])
    row_specs = [specs.get(ck, {}) if isinstance(ck, str) else {} for ck in config_keys]
    common = _common(row_specs)  # the page merges it with each row's own keys
    facets, facet_values = _facets(row_specs, list(bare["Method"].astype(str)))
    sort_values = _sort_values(bare, columns)
    rows = []
    for i, cells in enumerate(shown.itertuples(index=False, name=None)):
        rows.append({"cells": [str(c) for c in cells], "sort": sort_values[i], "marks": marks[i],
                     "facets": facet_values[i], "runs": len(members[i])})

    row_of = {rid: i for i, ids in enumerate(members) for rid in ids}
    curve_stats = _curve_stats(curves(db, grid, study, names=list(CURVES), runs=runs), row_of)
    images = _Images(roots)
    by_row: dict[int, dict[str, list]] = {}
    arts = artifacts(db, grid, study, runs=runs)
    arts = arts[arts["kind"].isin(["sheet", "samples", "failures"]) & arts["run_id"].isin(row_of)]
    for a in arts.sort_values(["seed", "run_id"], kind="stable").itertuples(index=False):
        i = row_of[a.run_id]
        slot = by_row.setdefault(i, {"sheets": [], "samples": [], "failures": []})
        if a.kind == "sheet":
            expect = expected_steps(row_specs[i]) if a.status == "done" else set()
            slot["sheets"].append(images.sheet(a.key, int(a.seed), a.path, expect))
        elif a.kind == "samples":
            slot["samples"].append(images.samples(a.key, int(a.seed), a.path))
        else:
            slot["failures"].append(images.failures(a.key, int(a.seed), a.path))

    metric_names = list(attrs.get("metrics", []))
    run_lists: list[list[dict[str, Any]]] = [[] for _ in range(len(table))]
    cols = ["run_id", "key", "seed", "status", "error", "fingerprint", "finished_at"] + \
        [m for m in metric_names if m in runs.columns]
    for r in runs[cols].to_dict("records"):  # one pass over the runs, not one frame per row
        if r["run_id"] in row_of:
            run_lists[row_of[r["run_id"]]].append({
                "key": str(r["key"]), "seed": int(r["seed"]), "status": str(r["status"]),
                "error": str(r["error"] or ""), "fingerprint": str(r["fingerprint"] or "-")[:24],
                "finished": "" if r["finished_at"] is None or r["finished_at"] != r["finished_at"]
                else str(r["finished_at"])[:19],
                "metrics": {m: _num(r.get(m)) for m in metric_names}})
    details = []
    for i in range(len(table)):
        run_list = sorted(run_lists[i], key=lambda r: (r["seed"], r["key"]))
        ck, fp = config_keys[i], fingerprints[i]
        details.append({"row": i, "config_key": ck if isinstance(ck, str) else None,
                        "fingerprint": fp if isinstance(fp, str) else None,
                        "spec": {k: v for k, v in row_specs[i].items() if k not in common},
                        "runs": run_list, "metrics": metric_names, "curves": curve_stats.get(i, {}),
                        **by_row.get(i, {"sheets": [], "samples": [], "failures": []})})

    base = attrs.get("baseline")
    what = f"grid {grid}" if grid else f"study {study}" if study else "all runs"
    meta = {"title": title or f"ablate report: {what}", "grid": grid, "study": study, "db": safe_url(db.url),
            "baseline": None if base is None else {"label": str(base["label"]), "row": int(base["row"])},
            "runs": int(len(runs)), "rows": int(len(table))}
    return SiteData(table={"meta": meta, "columns": columns, "rows": rows, "facets": facets,
                           "pareto": _pareto(bare, *pareto_axes), "spec": common},
                    details=details, copies=images.copies, holes=images.holes, image_bytes=images.bytes,
                    texts=[list(t) for t in images.texts])

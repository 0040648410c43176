"""The results table in the seed notes' spirit: one row per variant (and hyperparameter setting),
mean ± std over seeds with n, variants that never finished listed as not trained."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pandas as pd
from sqlalchemy import select

from ..db import Database, GridRun, Metric, Run, safe_url
from ..registry import Registry, load_registry

# (metric, column title, higher is better, format)
METRIC_COLUMNS: list[tuple[str, str, bool, str]] = [
    ("fid_domain", "FID (domain) ↓", False, "{:.1f}"),
    ("fid", "FID ↓", False, "{:.1f}"),
    ("align_acc", "Align acc ↑", True, "{:.3f}"),
    ("clip_score", "CLIP score ↑", True, "{:.3f}"),
    ("blank_rate", "Blank ↓", False, "{:.3f}"),
    ("train_tokens_per_s", "Train tok/s ↑", True, "{:.0f}"),
    ("sample_images_per_s", "Sample img/s ↑", True, "{:.1f}"),
    ("params", "Params", False, "{:,.0f}"),
]
FORMATS = ("markdown", "csv")


def load_runs(db: Database, grid: Optional[str] = None) -> pd.DataFrame:
    """One row per run (of ``grid`` if given): identity, status, axis values, final metrics."""
    with db._sessions() as s:
        q = select(Run)
        if grid is not None:
            q = q.join(GridRun, GridRun.run_id == Run.id).where(GridRun.grid == grid)
        runs = list(s.scalars(q))
        ids = [r.id for r in runs]
        metrics = s.execute(select(Metric.run_id, Metric.name, Metric.value).where(
            Metric.run_id.in_(ids), Metric.step.is_(None))).all() if ids else []
    rows = [{"run_id": r.id, "key": r.key, "grid": r.grid, "variant": r.variant, "seed": r.seed,
             "status": r.status, "error": (r.error or "").strip().splitlines()[0] if r.error else "",
             "hyper": _hyper(r.overrides)} for r in runs]
    df = pd.DataFrame(rows, columns=["run_id", "key", "grid", "variant", "seed", "status", "error", "hyper"])
    if metrics:
        m = pd.DataFrame(metrics, columns=["run_id", "name", "value"]).pivot(index="run_id", columns="name", values="value")
        df = df.merge(m, left_on="run_id", right_index=True, how="left")
    return df


def _hyper(overrides: dict) -> str:
    items = {k: v for k, v in (overrides or {}).items() if k != "model.variant"}
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in sorted(items.items()))


def _mean_std(values: pd.Series, fmt: str) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    if len(v) == 1:
        return fmt.format(v.iloc[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def build_table(db: Database, grid: Optional[str] = None, registry: Optional[Registry] = None) -> pd.DataFrame:
    """The results table as a DataFrame of display strings (metrics: mean ± std over seeds)."""
    registry = registry or load_registry()
    runs = load_runs(db, grid)
    present = [m for m in METRIC_COLUMNS if m[0] in runs.columns and runs[m[0]].notna().any()]
    rows = []
    names = list(registry.variants) + sorted(set(runs["variant"]) - set(registry.variants))
    for name in names:
        cls = registry.variants.get(name)
        mine = runs[runs["variant"] == name]
        groups = list(mine.groupby("hyper", sort=True)) if len(mine) else [("", mine)]
        for hyper, g in groups:
            done = g[g["status"] == "done"]
            failed = g[g["status"] == "failed"]
            if len(done):
                trained = f"Yes ({len(done)})"
            elif len(failed):
                trained = f"Failed ({len(failed)})"
            elif len(g):
                trained = "No (" + ", ".join(f"{n} {st}" for st, n in g["status"].value_counts().items()) + ")"
            else:
                trained = "No"
            notes = cls.description if cls is not None else "variant no longer registered"
            if len(failed):
                notes += f" — failed: {failed['error'].iloc[0]}"
            row = {"Method": name, "Implemented": "Yes" if cls is not None else "No", "Trained": trained}
            for metric, title, _, fmt in present:
                row[title] = _mean_std(done[metric], fmt) if len(done) else "-"
            row["Hyperparameters"] = hyper or "base"
            row["Notes"] = notes
            rows.append(row)
    return pd.DataFrame(rows)


def render(table: pd.DataFrame, fmt: str = "markdown") -> str:
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt != "markdown":
        raise ValueError(f"--format: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    cols = list(table.columns)
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_results(db: Database, path: Path, grid: Optional[str] = None) -> str:
    """Render the markdown table and write it with its provenance to ``path``; return the table."""
    md = render(build_table(db, grid), "markdown")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"# Results\n\nRegenerated by `ablate table` from `{safe_url(db.url)}`"
            f"{f' (grid `{grid}`)' if grid else ''} at {stamp}.\n"
            "Metrics are mean ± std over seeds; the Trained column gives the number of finished runs.\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..utils import atomic_write_bytes
    atomic_write_bytes(path, (head + md).encode())
    return md
